//! Development aid for measuring the shim: a fake kuasar-vmm, and a fake
//! containerd client that keeps calls pending like containerd does.
//!
//! ```text
//! fake_vmm serve SOCKET         # Sandboxer + Task services; Wait blocks until Shutdown
//! fake_vmm client ADDRESS SECS  # Connect, State x100, Wait (pending), sleep SECS
//! ```
//! See crates/shim/README.md ("Measuring").

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use kuasar_api::containerd::api::Empty as TaskEmpty;
use kuasar_api::containerd::shim::shim::*;
use kuasar_api::containerd::shim::shim_ttrpc::{create_task, Task, TaskClient};
use kuasar_api::sandboxer::{
    create_sandboxer, DeleteSandboxRequest, Empty, PingResponse, RegisterSandboxRequest, Sandboxer,
};
use kuasar_api::ttrpc::{self, context, TtrpcContext};

#[derive(Default)]
struct Fake {
    done: Mutex<HashMap<String, bool>>,
    cv: Condvar,
}

impl Sandboxer for Fake {
    fn ping(&self, _: &TtrpcContext, _: Empty) -> ttrpc::Result<PingResponse> {
        let mut r = PingResponse::new();
        r.version = "fake".into();
        Ok(r)
    }
    fn register_sandbox(
        &self,
        _: &TtrpcContext,
        _: RegisterSandboxRequest,
    ) -> ttrpc::Result<Empty> {
        Ok(Empty::new())
    }
    fn delete_sandbox(&self, _: &TtrpcContext, _: DeleteSandboxRequest) -> ttrpc::Result<Empty> {
        Ok(Empty::new())
    }
}

impl Task for Fake {
    fn state(&self, _: &TtrpcContext, req: StateRequest) -> ttrpc::Result<StateResponse> {
        let mut r = StateResponse::new();
        r.id = req.id;
        Ok(r)
    }
    fn connect(&self, _: &TtrpcContext, _: ConnectRequest) -> ttrpc::Result<ConnectResponse> {
        Ok(ConnectResponse::new())
    }
    fn wait(&self, _: &TtrpcContext, req: WaitRequest) -> ttrpc::Result<WaitResponse> {
        let mut done = self
            .done
            .lock()
            .map_err(|_| ttrpc::Error::Others("lock".into()))?;
        while !done.get(&req.id).copied().unwrap_or(false) {
            done = self
                .cv
                .wait(done)
                .map_err(|_| ttrpc::Error::Others("lock".into()))?;
        }
        Ok(WaitResponse::new())
    }
    fn shutdown(&self, _: &TtrpcContext, req: ShutdownRequest) -> ttrpc::Result<TaskEmpty> {
        if let Ok(mut done) = self.done.lock() {
            done.insert(req.id, true);
        }
        self.cv.notify_all();
        Ok(TaskEmpty::new())
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("serve") if args.len() == 3 => {
            let _ = std::fs::remove_file(&args[2]);
            let fake = Arc::new(Fake::default());
            let mut s = ttrpc::Server::new()
                .bind(&format!("unix://{}", args[2]))
                .expect("bind")
                .register_service(create_sandboxer(fake.clone()))
                .register_service(create_task(fake));
            s.start().expect("start");
            loop {
                std::thread::park();
            }
        }
        Some("client") if args.len() == 4 => {
            let secs: u64 = args[3].parse().expect("seconds");
            let client = TaskClient::new(ttrpc::Client::connect(&args[2]).expect("connect"));
            let ctx = || context::with_timeout(5_000_000_000);
            let c = client
                .connect(ctx(), &ConnectRequest::new())
                .expect("Connect");
            println!("shim_pid {}", c.shim_pid);
            for i in 0..100 {
                let mut req = StateRequest::new();
                req.id = format!("c{i}");
                client.state(ctx(), &req).expect("State");
            }
            let waiter = client.clone();
            std::thread::spawn(move || {
                let mut req = WaitRequest::new();
                req.id = "c0".into();
                let _ = waiter.wait(context::Context::default(), &req);
            });
            println!("ready");
            std::thread::sleep(Duration::from_secs(secs));
        }
        _ => {
            eprintln!("usage: fake_vmm serve SOCKET | fake_vmm client ADDRESS SECS");
            std::process::exit(2);
        }
    }
}
