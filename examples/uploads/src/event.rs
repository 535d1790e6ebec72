//! The S3 event notification JSON (`eventVersion` 2.x), as S3 sends it to
//! SNS, SQS or Lambda: one message holds `Records`, each naming a bucket
//! and an object whose key is URL-encoded (`+` for a space, `%XX` for
//! anything else outside the unreserved set).
//!
//! Only what the handler reads is modelled; every other field (requester,
//! IP, response elements, ...) is ignored, so events from any S3 region or
//! S3-compatible store parse.

use serde::Deserialize;

/// One notification message.
#[derive(Debug, Clone, Deserialize)]
pub struct Event {
    #[serde(rename = "Records")]
    pub records: Vec<EventRecord>,
}

/// One object event.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EventRecord {
    /// `2.1`, `2.2`, `2.3`: the major version must be 2.
    pub event_version: String,
    /// `aws:s3`.
    pub event_source: String,
    /// When S3 finished the request (ISO 8601).
    #[serde(default)]
    pub event_time: String,
    /// `ObjectCreated:Put`, `ObjectCreated:CompleteMultipartUpload`, ...
    pub event_name: String,
    pub s3: S3Entity,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct S3Entity {
    pub bucket: Bucket,
    pub object: Object,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Bucket {
    pub name: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Object {
    /// URL-encoded: see [`Object::decoded_key`].
    pub key: String,
    /// Bytes; absent for deletions.
    #[serde(default)]
    pub size: Option<u64>,
    #[serde(default, rename = "eTag")]
    pub e_tag: Option<String>,
    #[serde(default)]
    pub version_id: Option<String>,
    /// Orders events of one key: a larger sequencer (compared as hex of
    /// equal length) is a later event.
    #[serde(default)]
    pub sequencer: Option<String>,
}

/// Why a message is not an event the handler can act on.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EventError {
    #[error("not an S3 event notification: {0}")]
    Json(String),
    #[error("an S3 event notification with no Records")]
    Empty,
    #[error("eventSource is {0:?}, not \"aws:s3\"")]
    Source(String),
    #[error("eventVersion {0:?} is not 2.x")]
    Version(String),
    #[error("object key {0:?} is not URL-encoded UTF-8")]
    Key(String),
}

impl Event {
    /// Parses and checks a notification. A message with a record from
    /// another source or a version other than 2.x is refused whole: it
    /// was not meant for this handler.
    pub fn parse(body: &[u8]) -> Result<Self, EventError> {
        let event: Event = serde_json::from_slice(body).map_err(|e| EventError::Json(e.to_string()))?;
        if event.records.is_empty() {
            return Err(EventError::Empty);
        }
        for r in &event.records {
            if r.event_source != "aws:s3" {
                return Err(EventError::Source(r.event_source.clone()));
            }
            if r.event_version.split('.').next() != Some("2") {
                return Err(EventError::Version(r.event_version.clone()));
            }
        }
        Ok(event)
    }
}

impl EventRecord {
    /// `ObjectCreated:*`: the only events this handler acts on (a
    /// subscription may receive others; they are skipped, not failed).
    pub fn is_object_created(&self) -> bool {
        self.event_name.starts_with("ObjectCreated:")
    }
}

impl Object {
    /// The key as stored: `+` is a space (a literal plus arrives as `%2B`),
    /// then `%XX` escapes are decoded as UTF-8.
    pub fn decoded_key(&self) -> Result<String, EventError> {
        let spaced = self.key.replace('+', " ");
        percent_encoding::percent_decode_str(&spaced)
            .decode_utf8()
            .map(|k| k.into_owned())
            .map_err(|_| EventError::Key(self.key.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example event of the S3 user guide ("Event message structure"),
    /// with a key that needs decoding.
    const PUT: &str = r#"{
      "Records": [{
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "awsRegion": "us-west-2",
        "eventTime": "1970-01-01T00:00:00.000Z",
        "eventName": "ObjectCreated:Put",
        "userIdentity": { "principalId": "AIDAJDPLRKLG7UEXAMPLE" },
        "requestParameters": { "sourceIPAddress": "127.0.0.1" },
        "responseElements": { "x-amz-request-id": "C3D13FE58DE4C810", "x-amz-id-2": "FMyUVURIY8/IgAtTv8xRjskZQpcIZ9KG4V5Wp6S7S/JRWeUWerMUE5JgHvANOjpD" },
        "s3": {
          "s3SchemaVersion": "1.0",
          "configurationId": "testConfigRule",
          "bucket": { "name": "mybucket", "ownerIdentity": { "principalId": "A3NL1KOZZKExample" }, "arn": "arn:aws:s3:::mybucket" },
          "object": { "key": "holiday+photos/caf%C3%A9%2B1.jpg", "size": 1024, "eTag": "d41d8cd98f00b204e9800998ecf8427e", "versionId": "096fKKXTRTtl3on89fVO.nfljtsv6qko", "sequencer": "0055AED6DCD90281E5" }
        }
      }]
    }"#;

    #[test]
    fn the_documented_event_parses_and_its_key_decodes() {
        let event = Event::parse(PUT.as_bytes()).unwrap();
        let r = &event.records[0];
        assert!(r.is_object_created());
        assert_eq!(r.s3.bucket.name, "mybucket");
        assert_eq!(r.s3.object.decoded_key().unwrap(), "holiday photos/café+1.jpg");
        assert_eq!(r.s3.object.size, Some(1024));
        assert_eq!(r.s3.object.e_tag.as_deref(), Some("d41d8cd98f00b204e9800998ecf8427e"));
        assert_eq!(r.s3.object.sequencer.as_deref(), Some("0055AED6DCD90281E5"));
    }

    #[test]
    fn other_messages_are_refused_naming_what_is_wrong() {
        assert!(matches!(Event::parse(b"hello"), Err(EventError::Json(_))));
        assert_eq!(Event::parse(br#"{"Records": []}"#).err(), Some(EventError::Empty));
        let sqs = PUT.replace("aws:s3", "aws:sqs");
        assert_eq!(Event::parse(sqs.as_bytes()).err(), Some(EventError::Source("aws:sqs".into())));
        let v3 = PUT.replace("\"2.1\"", "\"3.0\"");
        assert_eq!(Event::parse(v3.as_bytes()).err(), Some(EventError::Version("3.0".into())));
        let bad = PUT.replace("caf%C3%A9", "caf%C3");
        let event = Event::parse(bad.as_bytes()).unwrap();
        assert!(matches!(event.records[0].s3.object.decoded_key(), Err(EventError::Key(_))));
    }
}
