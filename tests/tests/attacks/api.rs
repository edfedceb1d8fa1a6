//! Attacks: api.
