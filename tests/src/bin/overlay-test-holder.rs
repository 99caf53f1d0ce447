//! For `tests/tests/interrupt.rs`: makes what a test makes (a namespace
//! with a veth pair in it, a pin directory, a work directory, a child
//! process inside the namespace), prints what it made, one `KIND NAME` line
//! each, then `ready`, and waits to be interrupted.

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use overlay_tests::{NetNs, PinDir, TempDir, lab::ChildGuard};

fn main() {
    let ns = NetNs::new();
    ns.veth_pair("hold0", "hold1");
    let pins = PinDir::new();
    std::fs::create_dir_all(pins.path()).expect("creating the pin directory");
    let work = TempDir::new("overlay-holder-");
    std::fs::write(work.path().join("log"), "held\n").expect("writing into the work directory");
    let child = ChildGuard(
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", ns.name()))
            .args(["sleep", "600"])
            .stdin(Stdio::null())
            .spawn()
            .expect("starting sleep"),
    );
    println!("netns {}", ns.name());
    println!("dir {}", pins.path().display());
    println!("dir {}", work.path().display());
    println!("pid {}", child.0.id());
    println!("ready");
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}
