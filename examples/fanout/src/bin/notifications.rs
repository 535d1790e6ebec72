//! `notifications`: publishes N notifications to the topic (a RabbitMQ
//! exchange the coordinator declares) with publisher confirms; every
//! `--bounce-every`th goes to a recipient at the bounce domain, which the
//! notifier gives up on. Each message has a message id (`n-<i>`), which
//! the audit log is keyed by.

use anyhow::Result;
use clap::Parser;
use shardline_worker::amqp::{Message, Publisher};

#[derive(Parser)]
#[command(about = "Publish notifications to a shardline topic")]
struct Args {
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    amqp_url: String,
    #[arg(long, default_value = "notifications")]
    topic: String,
    #[arg(long, default_value_t = 200)]
    count: u64,
    /// Every Nth recipient bounces (0: none).
    #[arg(long, default_value_t = 10)]
    bounce_every: u64,
    #[arg(long, default_value = "bounce.example")]
    bounce_domain: String,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let publisher = Publisher::connect(&args.amqp_url, "notifications");
    let messages: Vec<Message> = (0..args.count)
        .map(|i| {
            let bounces = args.bounce_every > 0 && i % args.bounce_every == args.bounce_every - 1;
            let domain = if bounces { args.bounce_domain.as_str() } else { "example.com" };
            let body = serde_json::json!({"recipient": format!("user{i}@{domain}"), "text": format!("order {i} shipped")});
            Message {
                exchange: args.topic.clone(),
                body: body.to_string().into_bytes(),
                message_id: Some(format!("n-{i}")),
                ..Message::default()
            }
        })
        .collect();
    for chunk in messages.chunks(500) {
        publisher.publish(chunk).await.map_err(|e| anyhow::anyhow!("publish to {}: {e}", args.topic))?;
    }
    println!("published {} notifications to {}", args.count, args.topic);
    Ok(())
}
