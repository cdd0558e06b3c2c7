#![no_main]
//! Any group file (server-sent YAML) is an overlay of server-settable keys or an error
//! naming the file; never a panic, and never more than the node limit's worth of work
//! (libFuzzer's -rss_limit_mb and -timeout catch an alias bomb that slips through).
use libfuzzer_sys::fuzz_target;
use wazuh_agent::config::{self, Config};
use wazuh_agent::groups::parse_group_file;

fuzz_target!(|data: &[u8]| {
    match parse_group_file("fuzz.yml", data) {
        Ok((overlay, _ignored)) => {
            for (section, values) in &overlay {
                for name in values.as_table().expect("sections are tables").keys() {
                    assert!(config::key(section, name).is_some_and(|k| k.server), "{section}.{name} is local only");
                }
            }
            // Merged over an empty local file: a configuration or an error naming the file.
            if let Err(e) = Config::with_overlays("", None, &[("fuzz.yml".into(), overlay)]) {
                assert!(e.to_string().contains("fuzz.yml"), "{e}");
            }
        }
        Err(e) => assert!(e.to_string().starts_with("group file fuzz.yml "), "{e}"),
    }
});
