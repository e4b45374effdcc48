//! Arbitrary bytes as a mesh stream: every frame decoder and the invite-code parser must
//! return errors, never panic, and never allocate more than the frame limit.
#![no_main]

use futures_util::FutureExt;
use futures_util::io::Cursor;
use kith_mesh::wire::{self, Advert, Pairing, ToClient, ToServer};
use libfuzzer_sys::fuzz_target;

fn drain<T: serde::de::DeserializeOwned>(data: &[u8]) {
    let mut cursor = Cursor::new(data);
    // A few frames at most per input: each read either consumes bytes or ends.
    for _ in 0..8 {
        match wire::read::<T>(&mut cursor).now_or_never() {
            Some(Ok(Some(_))) => continue,
            _ => break,
        }
    }
}

fuzz_target!(|data: &[u8]| {
    drain::<ToServer>(data);
    drain::<ToClient>(data);
    drain::<Pairing>(data);
    drain::<Advert>(data);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = kith_mesh::InviteCode::decode(text);
    }
});
