//! The media side of Tiandi's conferences, through FFmpeg (ffmpeg-next): a source becomes
//! tracks ([`source`]: H.264 in two renditions with keyframes at the same frames, AAC audio,
//! encoded by [`encode`]); received tracks are played as MPEG-TS to a decoder, a TV, VLC or a
//! file ([`sink`]); MPEG-TS recordings become Matroska or MP4 ([`remux`]). The `tiandi-video`
//! binary (relay, `join --publish/--play/--record`, `remux`) is this crate's.
//!
//! This crate owns every use of FFmpeg's libraries in the workspace; the conference core
//! (`tiandi-video`: relay, rooms, wire, recording as MPEG-TS) must never need it, so that the
//! controller, which embeds the relay, links no FFmpeg. FFmpeg calls block, so sources and
//! sinks run on threads of their own; tracks and channels connect them to the async side.

use std::sync::Arc;

use ffmpeg_next as ff;
use tiandi_video::track::Track;

pub mod cli;
pub mod encode;
pub mod join;
pub mod join_paths;
pub mod relay_node;
pub mod remux;
pub mod sink;
pub mod source;

pub use remux::remux;
pub use source::{AUDIO_GROUP, Source, SourceOptions, open_source};
pub use tiandi_video::play::{Budget, Live, MediaError, PlayStats};

/// An FFmpeg error as a [`MediaError`], saying what failed.
pub(crate) fn ffe(what: impl Into<String>) -> impl FnOnce(ff::Error) -> MediaError {
    let what = what.into();
    move |source| MediaError::Codec {
        what,
        source: Box::new(source),
    }
}

/// Microseconds: the media clock on the wire.
pub(crate) const US: ff::Rational = ff::Rational(1, 1_000_000);

pub fn init() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = ff::init();
        ff::device::register_all();
        ff::util::log::set_level(ff::util::log::Level::Error);
    });
}

/// Plays `tracks` (received, or a local source's) into `spec` ([`sink::open`]: `udp://HOST:PORT`,
/// or a `.ts`, `.mkv` or `.mp4` file) until they end or `stop` fires, as
/// [`tiandi_video::play::play_into`] says: a late frame waited for within `budget` (then the
/// picture catches up, the sound is concealed), the start at a video keyframe with its sound.
pub async fn play(
    tracks: Vec<Arc<Track>>,
    spec: &str,
    stop: tokio_util::sync::CancellationToken,
    budget: Budget,
    live: Arc<Live>,
) -> Result<PlayStats, MediaError> {
    let spec = spec.to_string();
    let open: tiandi_video::play::OpenMux = Box::new(move |infos| sink::open(&spec, infos));
    tiandi_video::play::play_into(tracks, open, stop, budget, live).await
}
