//! Tiandi's satellite-link emulator. The kernel here has no `tc netem`, so delay, jitter, loss,
//! reordering, duplication, corruption and rate limits are applied in user space, on Ethernet
//! frames passed between two TAP devices: [`model`] decides each frame's fate (pure,
//! unit-tested), [`emu`] moves the frames, [`topo`] builds a controller and N sites in network
//! namespaces, each site behind its own emulated link (and optionally a second one: a
//! dual-homed site), and [`control`] lets a running emulator be cut, restored and re-shaped
//! (rain fade) from another process.

pub mod cli;
pub mod control;
pub mod emu;
pub mod model;
pub mod topo;

pub use emu::{LinkHandle, LinkStatus};
pub use model::Shape;
pub use topo::{Spec, Topology};
