#!/bin/sh
# Scenario 10: blkbackd's Xenstore client against the real C xenstored. The
# checks are the ones the host suite runs against the embedded server
# (xenstore::conformance): bytes, error names, directories and DIRECTORY_PART,
# permissions, watches, transactions including a forced EAGAIN conflict.
. /vmlib.sh
if blkbackd xenstore-check --endpoint /run/xenstored/socket; then
  mark "xenstore-client PASS"
else
  mark "xenstore-client FAIL"
fi
