#![no_main]
//! Any line either parses into an event that survives the queue's encoding, or is
//! rejected with a reason; it never panics.
use libfuzzer_sys::fuzz_target;
use wazuh_agent::event::parse_line;
use wazuh_agent::queue::format;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(e)) = parse_line(data) {
        let mut buf = Vec::new();
        format::encode(&e, &mut buf);
        let s = format::scan(&buf, 0);
        assert_eq!(s.frames.len(), 1);
        assert_eq!(format::decode(&buf[s.frames[0].clone()]).as_ref(), Some(&e));
    }
});
