//! Fuzzes the incremental SSE scanner: any bytes, cut into chunks at places the input picks,
//! must scan without panicking and give the same events as the bytes fed whole.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mantlegate::meter::sse::SseScanner;

/// Events as (event name, data), owned.
fn scan<'a>(chunks: impl Iterator<Item = &'a [u8]>) -> Vec<(Option<String>, Vec<u8>)> {
    let mut scanner = SseScanner::new();
    let mut seen = Vec::new();
    for chunk in chunks {
        scanner.feed(chunk, |ev| {
            assert!(ev.end <= chunk.len(), "an event ends inside its chunk");
            seen.push((ev.event.map(str::to_owned), ev.data.to_vec()));
        });
    }
    scanner.finish(|ev| seen.push((ev.event.map(str::to_owned), ev.data.to_vec())));
    seen
}

fuzz_target!(|input: &[u8]| {
    // The first byte picks the chunk size (1 to 256); the rest is the stream.
    let Some((&size, stream)) = input.split_first() else {
        return;
    };
    let size = usize::from(size) + 1;
    let whole = scan(std::iter::once(stream));
    let split = scan(stream.chunks(size));
    assert_eq!(whole, split, "chunking changed the events");
    // Byte by byte, the hardest split of all.
    let bytewise = scan(stream.chunks(1));
    assert_eq!(whole, bytewise, "byte-by-byte feeding changed the events");
});
