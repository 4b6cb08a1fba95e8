//! Fuzzes the upstream response parser: any bytes, read as an answer's head and body in pieces
//! the input picks, must parse without panicking and read the same as the bytes fed whole.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mantlegate::upstream::fuzzing::{Method, read_in_pieces};

fuzz_target!(|input: &[u8]| {
    // The first byte picks the piece size (1 to 128) and the method (its top bit: HEAD, whose
    // answer has no body); the rest is what the upstream sent.
    let Some((&pick, wire)) = input.split_first() else {
        return;
    };
    let method = if pick & 0x80 == 0 {
        Method::POST
    } else {
        Method::HEAD
    };
    let size = usize::from(pick & 0x7f) + 1;
    let whole = read_in_pieces([wire], &method);
    let split = read_in_pieces(wire.chunks(size), &method);
    assert_eq!(whole, split, "reading in pieces changed the answer");
    let bytewise = read_in_pieces(wire.chunks(1), &method);
    assert_eq!(whole, bytewise, "reading byte by byte changed the answer");
});
