#![no_main]
//! Claim decoding and the renewal schedule never panic and never ask for a renewal
//! sooner than the floor, whatever the token says.
use libfuzzer_sys::fuzz_target;
use wazuh_agent::token::{MIN_RENEWAL, MAX_RENEWAL, decode_claims, renewal_delay};

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(c) = decode_claims(text) {
            for now in [0i64, 1_795_705_200, i64::MAX / 2, -1] {
                // The random spread never leaves the bounds, at either end of its range.
                for random in [0, u64::MAX / 2, u64::MAX] {
                    let d = renewal_delay(&c, now, random);
                    assert!(d >= MIN_RENEWAL && d <= MAX_RENEWAL);
                }
            }
        }
    }
});
