#![no_main]
//! Recovery of arbitrary bytes: never panics, frames lie inside the buffer, do not
//! overlap, and every frame it calls intact decodes.
use libfuzzer_sys::fuzz_target;
use wazuh_agent::queue::format;

fuzz_target!(|data: &[u8]| {
    let s = format::scan(data, 0);
    let mut end = 0;
    for f in &s.frames {
        assert!(f.start >= end && f.end <= data.len());
        end = f.end;
        let _ = format::decode(&data[f.clone()]);
    }
    assert!(s.valid_end <= data.len());
});
