//! `--bench N`: per-operation timings of the guest's OCI runtime as the host
//! sees them (each one a full agent RPC round trip), over N rounds in one VM.
use std::path::Path;
use std::time::{Duration, Instant};

use kuasar_api::agent::agent_ttrpc_async::AgentClient;
use kuasar_api::agent::*;

use crate::vm::{make_rootfs, make_spec};
use crate::{ctx, read_all, wait, Res};

/// Milliseconds of each timed step, one entry per round.
#[derive(Default)]
struct Times {
    create: Vec<f64>,
    start: Vec<f64>,
    exec: Vec<f64>,
    kill: Vec<f64>,
    delete: Vec<f64>,
    run: Vec<f64>,
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

async fn timed<T, E: std::fmt::Display>(
    what: &str,
    f: impl std::future::Future<Output = Result<T, E>>,
) -> Res<(T, f64)> {
    let t = Instant::now();
    let v = f.await.map_err(|e| format!("{what}: {e}"))?;
    Ok((v, ms(t)))
}

fn container_req(id: &str) -> ContainerRequest {
    ContainerRequest {
        container_id: id.into(),
        ..Default::default()
    }
}

fn create_req(dir: &Path, id: &str, args: &[&str]) -> Res<CreateContainerRequest> {
    make_rootfs(&dir.join("shared").join(id).join("rootfs"))?;
    Ok(CreateContainerRequest {
        container_id: id.into(),
        spec_json: make_spec(dir, args)?,
        rootfs_path: format!("/run/kuasar/shared/{id}/rootfs"),
        stdout: true,
        stderr: true,
        ..Default::default()
    })
}

/// One round: a long-running container is created, started, exec'd into,
/// killed and deleted; then a short one runs start to finish (create, start,
/// read its output, wait, delete).
async fn round(c: &AgentClient, dir: &Path, i: usize, t: &mut Times) -> Res<()> {
    let id = format!("b{i}");
    let req = create_req(dir, &id, &["sleep", "1000"])?;
    t.create
        .push(timed("create", c.create_container(ctx(), &req)).await?.1);
    let cr = container_req(&id);
    t.start
        .push(timed("start", c.start_container(ctx(), &cr)).await?.1);
    let process = serde_json::json!({
        "args": ["true"], "cwd": "/", "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}
    });
    let e = ExecProcessRequest {
        container_id: id.clone(),
        exec_id: "e".into(),
        process_json: serde_json::to_vec(&process).map_err(|e| e.to_string())?,
        ..Default::default()
    };
    t.exec
        .push(timed("exec", c.exec_process(ctx(), &e)).await?.1);
    if wait(c, &id, "e").await? != 0 {
        return Err("bench exec failed".into());
    }
    let sig = SignalProcessRequest {
        container_id: id.clone(),
        signal: 9,
        all: true,
        ..Default::default()
    };
    t.kill
        .push(timed("kill --all", c.signal_process(ctx(), &sig)).await?.1);
    wait(c, &id, "").await?;
    t.delete
        .push(timed("delete", c.remove_container(ctx(), &cr)).await?.1);

    let id = format!("r{i}");
    let req = create_req(dir, &id, &["echo", "hi"])?;
    let cr = container_req(&id);
    let t0 = Instant::now();
    c.create_container(ctx(), &req)
        .await
        .map_err(|e| format!("create {id}: {e}"))?;
    c.start_container(ctx(), &cr)
        .await
        .map_err(|e| format!("start {id}: {e}"))?;
    let out = read_all(c, &id, "", false).await?;
    let status = wait(c, &id, "").await?;
    c.remove_container(ctx(), &cr)
        .await
        .map_err(|e| format!("remove {id}: {e}"))?;
    t.run.push(ms(t0));
    if out != "hi\n" || status != 0 {
        return Err(format!("bench run: output {out:?}, status {status}"));
    }
    Ok(())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub async fn run(c: &AgentClient, dir: &Path, rounds: usize) -> Res<()> {
    let mut t = Times::default();
    // A first round warms the guest's page cache (the OCI runtime, its libraries and
    // busybox are read once), and is not counted.
    round(c, dir, 0, &mut Times::default()).await?;
    for i in 1..=rounds {
        round(c, dir, i, &mut t).await?;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("bench over {rounds} rounds (median ms, as RPCs from the host):");
    for (name, v) in [
        ("create", &mut t.create),
        ("start", &mut t.start),
        ("exec", &mut t.exec),
        ("kill --all", &mut t.kill),
        ("delete", &mut t.delete),
        ("whole run", &mut t.run),
    ] {
        let min = v.iter().copied().fold(f64::INFINITY, f64::min);
        let max = v.iter().copied().fold(0.0, f64::max);
        println!(
            "  {name:<10} {:7.1}   (min {min:.1}, max {max:.1})",
            median(v)
        );
    }
    Ok(())
}
