//! Fuzzes the usage extractor and the body meter: no input panics, and every usage read keeps
//! its invariants (cached input within input, reasoning within output).
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use mantlegate::meter::Usage;
use mantlegate::meter::stream::{BodyMeter, Kind};
use mantlegate::meter::usage::{self, ChatChunk, ResponsesEvent};

fn check(usage: Option<Usage>) {
    if let Some(u) = usage {
        assert!(u.cached_input <= u.input, "{u:?}");
        assert!(u.reasoning <= u.output, "{u:?}");
    }
}

fuzz_target!(|input: &[u8]| {
    // An optional event name before the first NUL, the data after it.
    let (event, data) = match input.iter().position(|&b| b == 0) {
        Some(at) => (std::str::from_utf8(&input[..at]).ok(), &input[at + 1..]),
        None => (None, input),
    };
    if let ChatChunk::Usage { usage, .. } = usage::chat_chunk(data) {
        check(Some(usage));
    }
    if let ResponsesEvent::Terminal { usage, .. } = usage::responses_event(event, data) {
        check(usage);
    }
    check(usage::chat_usage(data));
    check(usage::responses_usage(data));
    if let Some(object) = usage::response_object(data) {
        check(object.usage);
        let _ = usage::is_terminal(&object.status);
    }
    // The meters, over the data in two chunks.
    let cut = data.len() / 2;
    for kind in [
        Kind::ChatJson,
        Kind::ResponseJson,
        Kind::ChatStream { strip_usage: true },
        Kind::ChatStream { strip_usage: false },
        Kind::ResponsesStream,
    ] {
        let mut meter = BodyMeter::new(kind, data.len());
        for chunk in [&data[..cut], &data[cut..]] {
            let chunk = Bytes::copy_from_slice(chunk);
            if meter.rewrites() {
                meter.relay(&chunk);
                while meter.next_out().is_some() {}
            } else {
                meter.observe(&chunk);
            }
        }
        if meter.rewrites() {
            let _ = meter.finish_relay();
        }
        let metered = meter.result(true, true);
        check(Some(metered.usage));
    }
});
