//! Any stream, cut into reads at any points: the scanner never panics, and when it hides
//! nothing, the client receives exactly the bytes the backend sent.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use tollgate::upstream::sse::SseScanner;

fuzz_target!(|data: &[u8]| {
    let Some((&cuts, stream)) = data.split_first() else { return };
    for hide_usage in [false, true] {
        let mut scanner = SseScanner::new(hide_usage);
        let mut out = Vec::new();
        // The first byte decides the read size: 1..=256 bytes per read.
        for piece in stream.chunks(usize::from(cuts) + 1) {
            out.extend_from_slice(&scanner.feed(Bytes::copy_from_slice(piece)));
        }
        out.extend_from_slice(&scanner.finish());
        if !hide_usage {
            assert_eq!(out, stream);
        }
    }
});
