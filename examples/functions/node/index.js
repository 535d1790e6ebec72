// Sums the `amount` field of JSON records, per batch.
//
// An ordinary AWS Lambda function for Kinesis and SQS events, run unchanged
// by shardline's `function` handler (see ../README.md): the worker hands it
// each batch of a Kafka topic as a Kinesis event and each batch of a
// RabbitMQ subscription as an SQS event. A record that is not a JSON object
// with a numeric (or no) `amount` is named in `batchItemFailures`, so only
// it is retried and, at last, given up on; the rest of the batch counts.
"use strict";

exports.handler = async (event, context) => {
  let total = 0;
  const batchItemFailures = [];
  for (const record of event.Records) {
    const [id, body] = record.kinesis
      ? [record.kinesis.sequenceNumber, Buffer.from(record.kinesis.data, "base64").toString("utf8")]
      : [record.messageId, record.body];
    try {
      total += amount(body);
    } catch (e) {
      console.warn(`record ${id} skipped: ${e.message}`);
      batchItemFailures.push({ itemIdentifier: id });
    }
  }
  console.info(
    `${context.functionName}: ${event.Records.length} records, total ${total}, ${batchItemFailures.length} failed`,
  );
  return { batchItemFailures };
};

function amount(body) {
  let value;
  try {
    value = JSON.parse(body);
  } catch {
    throw new Error(`not JSON: ${JSON.stringify(body.slice(0, 60))}`);
  }
  if (value === null || typeof value !== "object" || Array.isArray(value)) {
    throw new Error("not a JSON object");
  }
  const number = "amount" in value ? value.amount : 0;
  if (typeof number !== "number") {
    throw new Error(`amount is not a number: ${JSON.stringify(number)}`);
  }
  return number;
}
