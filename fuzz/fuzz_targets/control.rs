//! ferryd's control-socket request parser on arbitrary bytes: each line a client could
//! send, with or without a request id. Nothing may panic; a request that parses
//! serialises back to a line that parses to the same request.
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
        // As ferryd reads a line: an id beside the request, which a request without one
        // parses the same as.
        if let Ok((req, id)) = Request::parse_with_id(line) {
            assert!(id.as_ref().is_none_or(|i| i.is_string() || i.is_number()));
            let again = serde_json::to_string(&req).expect("requests serialise");
            assert_eq!(format!("{req:?}"), format!("{:?}", Request::parse(&again).expect("a serialised request parses")));
        }
    }
});
