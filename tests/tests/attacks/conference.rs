//! Attacks: conference.
