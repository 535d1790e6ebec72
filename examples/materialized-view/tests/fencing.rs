//! The handler's two guarantees, batch by batch, on the real PostgreSQL
//! (`SHARDLINE_TEST_POSTGRES`, default the local `test` database) in a
//! schema of its own: a new owner (a greater epoch) skips the records an
//! earlier owner applied, and a zombie (a smaller epoch than the stored
//! one) is refused and writes nothing.

use std::sync::Arc;
use std::time::Duration;

use shardline_example_materialized_view::View;
use shardline_example_materialized_view::change::{Change, Op, Order};
use shardline_example_materialized_view::settings::Settings;
use shardline_worker::{Batch, Handler, Origin, Record};
use tokio_postgres::NoTls;

fn url() -> String {
    std::env::var("SHARDLINE_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

fn order(id: i64, customer: &str, amount: i64, status: &str) -> Order {
    Order { id, customer: customer.into(), amount, status: status.into() }
}

/// A batch of partition 0 of stream `s` under `epoch`: (offset, change).
fn batch(epoch: u64, changes: &[(i64, &Change)]) -> Batch {
    let records = changes
        .iter()
        .map(|(offset, c)| {
            Arc::new(Record {
                key: Some(c.id().to_string().into_bytes()),
                value: serde_json::to_vec(c).unwrap_or_default(),
                tombstone: false,
                headers: Vec::new(),
                timestamp_ms: None,
                origin: Origin::Kafka { partition: 0, offset: *offset },
                reply_to: None,
            })
        })
        .collect();
    let lease = "s/0".parse().unwrap_or_else(|e| panic!("{e}"));
    Batch { records, lease, epoch, lag: 0, deadline_ms: 0 }
}

/// The schema, dropped at the end (also when the test fails).
struct Schema(String);

impl Drop for Schema {
    fn drop(&mut self) {
        let sql = format!("DROP SCHEMA IF EXISTS {} CASCADE", self.0);
        let dropped = std::thread::spawn(move || -> Result<(), String> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(async {
                let (client, connection) =
                    tokio_postgres::connect(&url(), NoTls).await.map_err(|e| e.to_string())?;
                tokio::spawn(connection);
                client.batch_execute(&sql).await.map_err(|e| e.to_string())
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("could not drop schema {}: {dropped:?}", self.0);
        }
    }
}

#[tokio::test]
async fn a_new_owner_skips_what_was_applied_and_a_zombie_writes_nothing() {
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let schema = Schema(format!("mv_fencing_{}_{nanos}", std::process::id()));
    let settings = Settings {
        postgres: url(),
        schema: schema.0.clone(),
        connections: Some(2),
        idle_in_transaction_timeout: Duration::from_secs(10),
    };
    let view = View::open(&settings, 2).await.unwrap_or_else(|e| panic!("{e}"));
    let (client, connection) = tokio_postgres::connect(&url(), NoTls).await.unwrap_or_else(|e| panic!("{e}"));
    tokio::spawn(connection);
    let s = &schema.0;
    let totals = async || -> Vec<(String, i64, i64)> {
        let sql = format!("SELECT customer, orders, amount FROM {s}.customer_totals ORDER BY 1");
        let rows = client.query(&sql, &[]).await.unwrap_or_else(|e| panic!("{e}"));
        rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect()
    };
    let applied = async || -> (i64, i64, i64, i64, i64) {
        let sql = format!("SELECT epoch, next_offset, applied, skipped, refused FROM {s}.applied");
        let r = client.query_one(&sql, &[]).await.unwrap_or_else(|e| panic!("{e}"));
        (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4))
    };

    let (a1, b1, c1) =
        (order(1, "ann", 100, "new"), order(2, "bob", 200, "new"), order(3, "ann", 300, "new"));
    let create = |o: &Order| Change { op: Op::Create, before: None, after: Some(o.clone()), version: 1 };
    let (c_a1, c_b1, c_c1) = (create(&a1), create(&b1), create(&c1));
    let a2 = order(1, "ann", 150, "paid");
    let u_a2 = Change { op: Op::Update, before: Some(a1.clone()), after: Some(a2.clone()), version: 2 };
    let d_b = Change { op: Op::Delete, before: Some(b1.clone()), after: None, version: 2 };

    // The first owner, epoch 3, applies offsets 0..3.
    view.handle(&batch(3, &[(0, &c_a1), (1, &c_b1), (2, &c_c1)])).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(totals().await, [("ann".into(), 2, 400), ("bob".into(), 1, 200)]);
    assert_eq!(applied().await, (3, 3, 3, 0, 0));

    // It dies before its checkpoint: the next owner (epoch 4) is given
    // offsets 1 and 2 again, with 3 and 4. It skips the two.
    view.handle(&batch(4, &[(1, &c_b1), (2, &c_c1), (3, &u_a2), (4, &d_b)]))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        totals().await,
        [("ann".into(), 2, 450)],
        "bob's only order is deleted; ann's first is 150 now"
    );
    assert_eq!(applied().await, (4, 5, 5, 2, 0));

    // The first owner wakes up as a zombie with epoch 3 and a batch past
    // the stored offset: refused, nothing written, the refusal counted.
    let zombie =
        Change { op: Op::Create, before: None, after: Some(order(9, "zed", 999, "new")), version: 1 };
    let e = view
        .handle(&batch(3, &[(5, &zombie)]))
        .await
        .err()
        .unwrap_or_else(|| panic!("the zombie's batch was accepted"));
    assert!(e.message.contains("s/0 epoch 3 is a zombie: the view was written under epoch 4"), "{e}");
    assert_eq!(totals().await, [("ann".into(), 2, 450)]);
    assert_eq!(applied().await, (4, 5, 5, 2, 1));
    let statuses =
        client.query(&format!("SELECT status, orders FROM {s}.status_counts ORDER BY 1"), &[]).await;
    let statuses: Vec<(String, i64)> =
        statuses.unwrap_or_else(|e| panic!("{e}")).iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(statuses, [("new".into(), 1), ("paid".into(), 1)]);

    // A record that is not a change fails its batch, naming it; nothing moves.
    let mut bad = batch(4, &[(5, &zombie)]);
    bad.records = vec![Arc::new(Record { value: b"{}".to_vec(), ..(*bad.records[0]).clone() })];
    let e = view.handle(&bad).await.err().unwrap_or_else(|| panic!("a bad record was accepted"));
    assert!(e.message.starts_with("record 0@5 of s/0: not a change envelope"), "{e}");
    assert_eq!(applied().await, (4, 5, 5, 2, 1));
}
