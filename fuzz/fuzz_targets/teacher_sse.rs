//! Fuzzes the parser of the teacher's SSE stream: any bytes, split at any points, must give
//! whole events or an error, never a panic, and never more bytes than came in.
#![no_main]

use duet::teacher::sse::SseSplitter;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&cut, stream)) = data.split_first() else { return };
    let mut splitter = SseSplitter::default();
    let mut out = 0;
    for piece in stream.chunks(cut as usize + 1) {
        match splitter.push(piece) {
            Ok(events) => {
                for e in events {
                    assert!(e.raw.ends_with(b"\n\n") || e.raw.ends_with(b"\r\n\r\n"));
                    out += e.raw.len();
                }
            }
            Err(_) => return,
        }
    }
    assert!(out <= stream.len());
});
