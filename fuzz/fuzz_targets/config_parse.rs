//! The config parser on arbitrary text: every input is either a `Config`
//! or a list of errors, never a panic.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // A base directory that does not exist: relative paths (certificates,
    // token files) resolve to nothing, so no input reads a real file by
    // a relative name.
    if let Err(e) = spooky::config::parse(text, "fuzz", Path::new("/nonexistent")) {
        // Rendering the errors is part of the path a user sees.
        let _ = e.to_string();
    }
});
