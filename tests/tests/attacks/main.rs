//! Attacks: one test per finding of the security review (issue 15), each named after what it
//! tries, each against the real binaries over their real interfaces (HTTP, QUIC, files), so
//! that the same test run against the code before the fix fails. `SECURITY.md` says what each
//! one defends.

mod api;
mod conference;
mod console;
mod handshake;
mod names;
mod transfer;
