//! ferryd's control-socket request parser on arbitrary bytes: each line a client could
//! send. Nothing may panic; a request that parses serialises back to a line that parses to
//! the same request.
#![no_main]

use dataplane::daemon::Request;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    for line in text.lines() {
        if let Ok(req) = Request::parse(line) {
            let again = serde_json::to_string(&req).expect("requests serialise");
            let back = Request::parse(&again).expect("a serialised request parses");
            assert_eq!(format!("{req:?}"), format!("{back:?}"));
        }
    }
});
