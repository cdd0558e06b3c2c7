#![no_main]
//! Any commands answer parses into valid commands plus reasons, or an error; every
//! accepted set-group names only safe group files.
use libfuzzer_sys::fuzz_target;
use wazuh_agent::commands::{Action, parse_body, validate_group};

fuzz_target!(|data: &[u8]| {
    if let Ok(parsed) = parse_body(data, "0191a2b3-0000-7000-8000-000000000001") {
        for c in parsed.commands {
            assert!(!c.document_id.is_empty());
            if let Action::SetGroup { groups } = c.action {
                for g in groups {
                    assert!(validate_group(&g).is_ok() && !g.contains('/') && !g.starts_with('.'));
                }
            }
        }
    }
});
