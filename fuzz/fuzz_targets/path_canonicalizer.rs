//! Fuzzes the path canonicalizer: any bytes must be refused or given a canonical form that is
//! its own canonical form, never a panic, and never one with a shape the proxy refuses.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mantlegate::proxy::endpoint::canonicalize;

fuzz_target!(|input: &[u8]| {
    let Ok(once) = canonicalize(input) else {
        return;
    };
    assert!(once.starts_with('/'), "a canonical path is absolute");
    assert!(!once.contains("//"), "no empty segment");
    assert!(!once.contains('\\'), "no backslash");
    assert!(
        !once.to_ascii_lowercase().contains("%25") && !once.to_ascii_lowercase().contains("%2f"),
        "no escaped `%` or `/`"
    );
    assert!(
        once.split('/').all(|s| s != "." && s != ".."),
        "no dot segment"
    );
    let twice = canonicalize(once.as_bytes());
    assert_eq!(twice.as_deref(), Ok(&*once), "canonical forms are stable");
});
