//! Site-side report delivery, the engine a real agent and a simulated site both run: the disk
//! spool that holds every report until the controller acknowledges a durable write ([`spool`]),
//! the uplink session that delivers them over mutual-TLS QUIC ([`session`]: Hello → Welcome,
//! current state first, the backlog windowed, reconnection with jittered backoff), and the
//! site's identity files ([`identity`]).
//!
//! It owns what happens to a report from the moment it is taken until it is acknowledged. It
//! must never collect figures (sysinfo, SNMP: the agent's job, or the simulator's), read the
//! agent's config, or know about file transfers beyond the hook a session offers
//! ([`SessionHook`]); it must never drop a report the controller has not acknowledged.

pub mod identity;
pub mod session;
pub mod spool;

pub use session::{PathLink, Route, SessionHook, Shared, UplinkConfig, WINDOW, run, run_paths};
