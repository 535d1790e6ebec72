//! `order-changes`: creates the change topic (if missing) and produces
//! deterministic random row changes of an `orders` table to it, keyed by
//! row id so each row's changes stay in one partition, in order: the
//! stream the `materialized-view` worker reads in a demo run.

use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use shardline_example_materialized_view::generate::Generator;

#[derive(Parser)]
#[command(about = "Produce random changes of an orders table to a Kafka topic")]
struct Args {
    #[arg(long, default_value = "127.0.0.1:9092")]
    brokers: String,
    #[arg(long, default_value = "order-changes")]
    topic: String,
    /// Partitions of the topic when it is created.
    #[arg(long, default_value_t = 4)]
    partitions: i32,
    /// Distinct rows (order ids 0..rows).
    #[arg(long, default_value_t = 300)]
    rows: i64,
    #[arg(long, default_value_t = 3000)]
    changes: u64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print the sum of the topic's partition ends (what the view's
    /// `applied.next_offset` add up to once it has caught up) and exit.
    #[arg(long)]
    end: bool,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    if args.end {
        println!("{}", end(&args.brokers, &args.topic)?);
        return Ok(());
    }
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", &args.brokers).create().context("Kafka admin client")?;
    let topic = NewTopic::new(&args.topic, args.partitions, TopicReplication::Fixed(1));
    for result in admin.create_topics([&topic], &AdminOptions::new()).await.context("create topic")? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, e)) => anyhow::bail!("cannot create topic {name}: {e}"),
        }
    }
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &args.brokers)
        .set("acks", "all")
        .set("linger.ms", "5")
        .create()
        .context("Kafka producer")?;
    let mut generator = Generator::new(args.seed, args.rows);
    // Changes of a row must reach the topic in order: each is acknowledged
    // before the next is sent.
    for n in 0..args.changes {
        let change = generator.change();
        let (key, value) = (change.id().to_string(), serde_json::to_string(&change)?);
        producer
            .send(FutureRecord::to(&args.topic).key(&key).payload(&value), Duration::from_secs(30))
            .await
            .map_err(|(e, _)| anyhow::anyhow!("produce change {n}: {e}"))?;
    }
    println!("produced {} changes of {} rows to {}", args.changes, args.rows, args.topic);
    Ok(())
}

/// The sum of the high watermarks of `topic`'s partitions.
fn end(brokers: &str, topic: &str) -> Result<i64> {
    let consumer: BaseConsumer = ClientConfig::new().set("bootstrap.servers", brokers).create()?;
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let partitions = metadata.topics().first().map(|t| t.partitions().len()).unwrap_or(0);
    let mut sum = 0;
    for p in 0..partitions {
        sum += consumer.fetch_watermarks(topic, i32::try_from(p)?, Duration::from_secs(10))?.1;
    }
    Ok(sum)
}
