//! Remuxing: the audio and video of a media file into another container, no re-encoding
//! (`ffmpeg -i SRC -c copy DST`): how a relay's MPEG-TS recording becomes Matroska or MP4,
//! which want the codec extradata (avcC, AudioSpecificConfig) FFmpeg's demuxer supplies.

use ffmpeg_next as ff;

use crate::{MediaError, ffe, init};

/// Copies the audio and video of the media file `src` into `dst`, whose container follows its
/// extension (no re-encoding): what `ffmpeg -i SRC -c copy DST` does.
pub fn remux(src: &str, dst: &str) -> Result<(), MediaError> {
    init();
    let mut ictx = ff::format::input(&src).map_err(ffe(format!("reading {src}")))?;
    let mut octx = ff::format::output(&dst).map_err(ffe(format!("creating {dst}")))?;
    // Input stream index -> (output stream index, input time base).
    let mut map = vec![None; ictx.nb_streams() as usize];
    for ist in ictx.streams() {
        let medium = ist.parameters().medium();
        if medium != ff::media::Type::Audio && medium != ff::media::Type::Video {
            continue;
        }
        let mut ost = octx
            .add_stream(ff::encoder::find(ff::codec::Id::None))
            .map_err(ffe(format!("adding a stream to {dst}")))?;
        ost.set_parameters(ist.parameters());
        clear_codec_tag(&mut ost);
        map[ist.index()] = Some((ost.index(), ist.time_base()));
    }
    if map.iter().all(Option::is_none) {
        return Err(MediaError::Unsupported(format!(
            "{src} holds no audio or video"
        )));
    }
    octx.write_header()
        .map_err(ffe(format!("writing {dst}'s header")))?;
    for (ist, mut packet) in ictx.packets() {
        let Some((index, tb)) = map.get(ist.index()).copied().flatten() else {
            continue;
        };
        let out_tb = octx.stream(index).map_or(tb, |s| s.time_base());
        packet.rescale_ts(tb, out_tb);
        packet.set_position(-1);
        packet.set_stream(index);
        packet
            .write_interleaved(&mut octx)
            .map_err(ffe(format!("writing {dst}")))?;
    }
    octx.write_trailer()
        .map_err(ffe(format!("finishing {dst}")))?;
    Ok(())
}

/// MPEG-TS labels its streams with its own codec tags (0x1B for H.264); Matroska and MP4
/// refuse a foreign tag, and 0 lets the muxer choose its own. ffmpeg-next has no setter
/// for it (its remux example does the same).
#[allow(unsafe_code)]
fn clear_codec_tag(ost: &mut ff::format::stream::StreamMut) {
    // SAFETY: `ost` is a live stream of an output context we hold mutably; its
    // AVCodecParameters is allocated with the stream and `codec_tag` is a plain integer.
    unsafe {
        (*ost.parameters().as_mut_ptr()).codec_tag = 0;
    }
}
