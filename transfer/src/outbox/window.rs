//! Daily time windows a job may be sent in: [`tiandi_link::window`] (a site's satellite path
//! has one too), re-exported where the outbox always had them.

pub use tiandi_link::window::{Window, as_text};
