//! Compiles hls.js (from npm, web/node_modules) into the edge's player page when it is
//! installed; the page is served without it otherwise and says how to install it.

use std::path::Path;

fn main() {
    let src = Path::new("web/node_modules/hls.js/dist/hls.min.js");
    // npm rewrites this file on every install; watching it (not the file itself) also notices
    // a first install.
    println!("cargo:rerun-if-changed=web/node_modules/.package-lock.json");
    println!("cargo:rerun-if-changed=web/package-lock.json");
    let out = Path::new(&std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("hls.min.js");
    let body = std::fs::read(src).unwrap_or_else(|_| {
        println!(
            "cargo:warning=web/node_modules/hls.js is missing: the player page will not play \
             (run `npm ci --prefix web`, or use deploy/run.sh)"
        );
        Vec::new()
    });
    std::fs::write(&out, body).expect("writing hls.min.js to OUT_DIR");
}
