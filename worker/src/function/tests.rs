//! The process pool and its Runtime API against real processes: a small
//! runtime client written with Python's standard library (the real
//! runtime clients, awslambdaric, aws-lambda-ric and lambda_runtime, run
//! in `tests/tests/functions.rs` through whole workers). Its event says
//! what to do (`action`), and its reply reports what it saw.

use std::time::Duration;

use axum::body::Bytes;
use serde_json::{Value, json};

use super::pool::{Outcome, Pool, Spec};
use crate::health::Health;

const CLIENT: &str = r#"
import json, os, signal, sys, time, urllib.request, urllib.error
base = "http://" + os.environ["AWS_LAMBDA_RUNTIME_API"] + "/2018-06-01/runtime"
def post(path, doc):
    req = urllib.request.Request(base + path, data=json.dumps(doc).encode(), method="POST")
    try:
        return urllib.request.urlopen(req).status
    except urllib.error.HTTPError as e:
        return e.code
mode = os.environ.get("MODE", "")
if mode == "init-error":
    post("/init/error", {"errorType": "Runtime.ImportModuleError", "errorMessage": "No module named 'app'"})
    sys.exit(1)
if mode == "exit-at-init":
    sys.exit(4)
if mode == "hang-at-init":
    time.sleep(60)
if os.environ.get("TERM_FILE"):
    def on_term(*_):
        open(os.environ["TERM_FILE"], "a").write("%d\n" % os.getpid())
        sys.exit(0)
    signal.signal(signal.SIGTERM, on_term)
while True:
    r = urllib.request.urlopen(base + "/invocation/next")
    rid = r.headers["Lambda-Runtime-Aws-Request-Id"]
    event = json.loads(r.read())
    action = event.get("action")
    seen = {
        "pid": os.getpid(),
        "event": event,
        "deadline": int(r.headers["Lambda-Runtime-Deadline-Ms"]),
        "arn": r.headers["Lambda-Runtime-Invoked-Function-Arn"],
        "trace": r.headers.get("Lambda-Runtime-Trace-Id"),
        "env": {k: os.environ.get(k) for k in ["AWS_LAMBDA_FUNCTION_NAME", "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
                                             "_HANDLER", "GREETING", "AWS_REGION", "AWS_LAMBDA_FUNCTION_VERSION"]},
    }
    if action == "sleep":
        time.sleep(event["seconds"])
    if action == "crash":
        os._exit(3)
    if action == "alloc":
        hog = bytearray(event["mib"] << 20)
    if action == "error":
        post("/invocation/%s/error" % rid, {"errorType": "ValueError", "errorMessage": "bad record 7", "stackTrace": []})
        continue
    if action == "wrong-id":
        seen["wrong_id_status"] = post("/invocation/not-%s/response" % rid, {})
        seen["init_error_status"] = post("/init/error", {"errorType": "Late", "errorMessage": "late"})
    status = post("/invocation/%s/response" % rid, seen)
    if action == "twice":
        post("/invocation/%s/response" % rid, seen)
"#;

fn spec(processes: u32, env: &[(&str, &str)]) -> Spec {
    let mut all: Vec<(String, String)> = vec![
        ("AWS_LAMBDA_FUNCTION_NAME".into(), "thumbs".into()),
        ("AWS_LAMBDA_FUNCTION_MEMORY_SIZE".into(), "128".into()),
        ("_HANDLER".into(), "app.handler".into()),
        ("AWS_REGION".into(), "local".into()),
        ("AWS_LAMBDA_FUNCTION_VERSION".into(), "$LATEST".into()),
    ];
    all.extend(env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
    Spec {
        handler: "thumbs".into(),
        command: vec!["python3".into(), "-c".into(), CLIENT.into()],
        env: all,
        working_dir: None,
        memory_limit: None,
        init_timeout: Duration::from_secs(10),
        function_arn: "arn:aws:lambda:local:000000000000:function:thumbs".into(),
        processes,
    }
}

fn in_ms(ms: u64) -> u64 {
    crate::unix_ms() + ms
}

async fn invoke(pool: &Pool, event: Value) -> Result<Outcome, String> {
    pool.invoke(Bytes::from(event.to_string()), in_ms(20_000), "Root=1-abc".into()).await
}

/// The reply of an invocation that succeeded, as JSON.
async fn reply(pool: &Pool, event: Value) -> Value {
    match invoke(pool, event).await {
        Ok(Outcome::Response(body)) => serde_json::from_slice(&body).unwrap_or_else(|e| panic!("{e}")),
        other => panic!("expected a response, got {other:?}"),
    }
}

/// Waits until `n` processes initialised: one started slowly would
/// otherwise leave both invocations of a pair to the other.
async fn ready(pool: &Pool, n: usize) {
    let mut status = pool.status();
    let all = tokio::time::timeout(Duration::from_secs(30), status.wait_for(|s| s.ready >= n));
    assert!(matches!(all.await, Ok(Ok(_))), "{n} processes did not initialise");
}

fn pid(v: &Value) -> i64 {
    v["pid"].as_i64().unwrap_or_else(|| panic!("no pid in {v}"))
}

fn alive(pid: i64) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid as i32, 0) == 0 }
}

async fn wait_gone(pid: i64) {
    for _ in 0..100 {
        if !alive(pid) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("process {pid} still runs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_initialises_once_and_sees_lambdas_invocation() {
    let pool = Pool::start(spec(1, &[("GREETING", "hi")]), Health::default());
    let deadline = in_ms(20_000);
    let first = match pool.invoke(Bytes::from(r#"{"n": 1}"#), deadline, "Root=1-5e1b-abc".into()).await {
        Ok(Outcome::Response(body)) => {
            serde_json::from_slice::<Value>(&body).unwrap_or_else(|e| panic!("{e}"))
        }
        other => panic!("{other:?}"),
    };
    assert_eq!(first["event"], json!({"n": 1}));
    assert_eq!(first["deadline"].as_u64(), Some(deadline));
    assert_eq!(first["arn"], "arn:aws:lambda:local:000000000000:function:thumbs");
    assert_eq!(first["trace"], "Root=1-5e1b-abc");
    assert_eq!(first["env"]["GREETING"], "hi");
    assert_eq!(first["env"]["_HANDLER"], "app.handler");
    for n in 2..5 {
        let again = reply(&pool, json!({"n": n})).await;
        assert_eq!(pid(&again), pid(&first), "one process takes invocation after invocation");
        assert_eq!(again["event"]["n"], n);
    }
    pool.shutdown().await;
    wait_gone(pid(&first)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_invocations_take_separate_processes_one_at_a_time() {
    let pool = Pool::start(spec(2, &[]), Health::default());
    ready(&pool, 2).await;
    let mut pids = std::collections::BTreeSet::new();
    for _ in 0..3 {
        let (a, b) = tokio::join!(
            reply(&pool, json!({"action": "sleep", "seconds": 0.3})),
            reply(&pool, json!({"action": "sleep", "seconds": 0.3}))
        );
        assert_ne!(pid(&a), pid(&b), "two invocations at once on one process");
        pids.extend([pid(&a), pid(&b)]);
    }
    assert_eq!(pids.len(), 2, "concurrency 2 runs exactly two processes: {pids:?}");
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_crashes_and_timeouts_end_the_invocation_and_the_crashed_process() {
    let pool = Pool::start(spec(1, &[]), Health::default());
    let before = reply(&pool, json!({})).await;

    match invoke(&pool, json!({"action": "error"})).await {
        Ok(Outcome::Error(e)) => {
            assert_eq!((e.error_type.as_str(), e.message.as_str()), ("ValueError", "bad record 7"));
        }
        other => panic!("{other:?}"),
    }
    let same = reply(&pool, json!({})).await;
    assert_eq!(pid(&same), pid(&before), "a reported error keeps the process");

    match invoke(&pool, json!({"action": "crash"})).await {
        Ok(Outcome::Died(why)) => {
            assert!(why.contains("exit status: 3") && why.contains("during invocation"), "{why}")
        }
        other => panic!("{other:?}"),
    }
    let after_crash = reply(&pool, json!({})).await;
    assert_ne!(pid(&after_crash), pid(&before), "a crashed process is replaced");

    // The batch policy's timeout drops the invocation: the process still
    // holding it is killed and replaced.
    let slow = invoke(&pool, json!({"action": "sleep", "seconds": 30}));
    assert!(tokio::time::timeout(Duration::from_millis(500), slow).await.is_err());
    wait_gone(pid(&after_crash)).await;
    let after_timeout = reply(&pool, json!({})).await;
    assert_ne!(pid(&after_timeout), pid(&after_crash));
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posts_for_another_invocation_and_late_init_errors_are_refused_as_lambda_does() {
    let pool = Pool::start(spec(1, &[]), Health::default());
    let seen = reply(&pool, json!({"action": "wrong-id"})).await;
    assert_eq!(seen["wrong_id_status"], 400);
    assert_eq!(seen["init_error_status"], 403);
    // A second response for the same invocation is refused too, and the
    // process goes on with the next one.
    let first = reply(&pool, json!({"action": "twice"})).await;
    let next = reply(&pool, json!({})).await;
    assert_eq!(pid(&first), pid(&next));
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_init_failure_marks_the_worker_unhealthy_and_fails_invocations_by_name() {
    for (mode, expected) in [
        ("init-error", "Runtime.ImportModuleError: No module named 'app'"),
        ("exit-at-init", "exited (exit status: 4) before asking for an invocation"),
        ("hang-at-init", "no request for an invocation within init_timeout"),
    ] {
        let health = Health::default();
        let mut s = spec(1, &[("MODE", mode)]);
        // Short only where the test waits it out: Python alone can take
        // longer than that to start on a busy machine.
        if mode == "hang-at-init" {
            s.init_timeout = Duration::from_millis(500);
        }
        let pool = Pool::start(s, health.clone());
        let mut status = pool.status();
        let failed =
            tokio::time::timeout(Duration::from_secs(10), status.wait_for(|s| s.init_failure.is_some()));
        let failure = match failed.await {
            Ok(Ok(s)) => s.init_failure.clone().unwrap_or_default(),
            other => panic!("{mode}: no init failure: {other:?}"),
        };
        assert!(failure.contains(expected), "{mode}: {failure}");
        let problems = health.problems();
        assert!(
            problems.iter().any(|p| p.contains("function `thumbs`") && p.contains(expected)),
            "{problems:?}"
        );
        // No process is ready (none ever will be): the invocation fails
        // before its deadline, naming the init failure.
        let result = pool.invoke(Bytes::from("{}"), in_ms(700), String::new()).await;
        let Err(why) = result else { panic!("{mode}: an invocation ran without an initialised process") };
        assert!(why.contains("could initialise") && why.contains(expected), "{mode}: {why}");
        pool.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_beyond_the_limit_ends_the_process_not_the_worker() {
    let mut s = spec(1, &[]);
    s.memory_limit = Some(64 << 20);
    let pool = Pool::start(s, Health::default());
    let small = reply(&pool, json!({"action": "alloc", "mib": 8})).await;
    match invoke(&pool, json!({"action": "alloc", "mib": 256})).await {
        Ok(Outcome::Died(why)) => assert!(why.contains("exited"), "{why}"),
        other => panic!("256 MiB under a 64 MiB limit: {other:?}"),
    }
    let next = reply(&pool, json!({})).await;
    assert_ne!(pid(&next), pid(&small));
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_sends_sigterm_and_waits() {
    let dir = std::env::temp_dir().join(format!("shardline-fn-term-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    let file = dir.join("terms");
    let path = file.display().to_string();
    let pool = Pool::start(spec(2, &[("TERM_FILE", &path)]), Health::default());
    ready(&pool, 2).await;
    let (a, b) = tokio::join!(
        reply(&pool, json!({"action": "sleep", "seconds": 0.2})),
        reply(&pool, json!({"action": "sleep", "seconds": 0.2}))
    );
    pool.shutdown().await;
    let text = std::fs::read_to_string(&file).unwrap_or_default();
    let mut termed: Vec<i64> = text.lines().filter_map(|l| l.parse().ok()).collect();
    termed.sort_unstable();
    let mut expected = vec![pid(&a), pid(&b)];
    expected.sort_unstable();
    assert_eq!(termed, expected, "each process handled SIGTERM");
    assert!(!alive(pid(&a)) && !alive(pid(&b)));
    std::fs::remove_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
}
