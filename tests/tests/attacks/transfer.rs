//! Attacks: transfer.
