//! The guest side of the simulation: a blkfront, and the `sim-guest` process
//! that runs it against a backend in another process.

pub mod blkfront;
pub mod driver;
pub mod guest;
pub mod world;
