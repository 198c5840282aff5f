//! blkbackd
