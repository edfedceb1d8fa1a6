//! Content-defined chunking: FastCDC (the 2020 algorithm, `fastcdc` crate) with the
//! repository's secret seed, so an edit moves only the chunks around it and the boundaries
//! say nothing about the content to whoever stores the packs.

use std::io::Read;

use fastcdc::v2020::{Normalization, StreamCDC};

use crate::BackupError;
use crate::crypto::Keys;

/// Smallest chunk (but the last of a file).
pub const MIN: usize = 256 * 1024;
/// The average chunk.
pub const AVG: usize = 1024 * 1024;
/// Largest chunk: also the bound on what one chunk may decompress to.
pub const MAX: usize = 4 * 1024 * 1024;

/// One chunk of a file.
pub struct Chunk {
    pub offset: u64,
    pub data: Vec<u8>,
}

/// The chunks of `source`, in order; memory is bounded by [`MAX`].
pub fn chunks<R: Read>(keys: &Keys, source: R) -> impl Iterator<Item = Result<Chunk, BackupError>> {
    StreamCDC::with_level_and_seed(
        source,
        MIN,
        AVG,
        MAX,
        Normalization::Level1,
        keys.chunk_seed,
    )
    .map(|c| match c {
        Ok(c) => Ok(Chunk {
            offset: c.offset,
            data: c.data,
        }),
        Err(fastcdc::v2020::Error::IoError(e)) => Err(BackupError::Io(e)),
        Err(e) => Err(BackupError::Io(std::io::Error::other(e.to_string()))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngCore, SeedableRng};

    fn cuts(keys: &Keys, data: &[u8]) -> Vec<(u64, usize)> {
        chunks(keys, data)
            .map(|c| c.map(|c| (c.offset, c.data.len())).unwrap())
            .collect()
    }

    #[test]
    fn boundaries_follow_the_content_and_the_seed() {
        let mut data = vec![0u8; 24 << 20];
        rand::rngs::StdRng::seed_from_u64(7).fill_bytes(&mut data);
        let keys = Keys::generate();
        let a = cuts(&keys, &data);
        assert!(a.iter().all(|&(_, n)| n <= MAX));
        assert!(a[..a.len() - 1].iter().all(|&(_, n)| n >= MIN));
        assert_eq!(a.iter().map(|&(_, n)| n).sum::<usize>(), data.len());
        let avg = data.len() / a.len();
        assert!((AVG / 2..AVG * 2).contains(&avg), "average {avg}");
        // Bytes inserted near the start: the chunks after the next boundary are the same.
        let mut edited = data.clone();
        edited.splice(100_000..100_000, [1u8; 1000]);
        let b = cuts(&keys, &edited);
        let same = b
            .iter()
            .filter(|&&(o, n)| a.iter().any(|&(o2, n2)| o2 + 1000 == o && n2 == n))
            .count();
        assert!(same + 2 >= a.len(), "{same} of {} chunks kept", a.len());
        // Another repository cuts elsewhere.
        let other = cuts(&Keys::generate(), &data);
        assert_ne!(a, other);
    }
}
