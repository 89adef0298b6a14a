//! One sample of every event, with fixed values. The golden files under
//! `tests/golden/` are these samples as encoded when the event was released;
//! the current code must decode them back to the same values.

use prost_types::Timestamp;
use shop_contracts::{order, user};

const USER_ID: &str = "0192f4c0-7d1e-7a3b-9c4d-5e6f708192a3";
const ORDER_ID: &str = "0192f4c1-0a2b-7c3d-8e4f-5a6b7c8d9e0f";

fn at(seconds: i64) -> Option<Timestamp> {
    Some(Timestamp {
        seconds,
        nanos: 123_456_000,
    })
}

/// A sample of one event: its wire type name and its encoding.
#[derive(Debug, Clone)]
pub struct Sample {
    /// `Event::TYPE_NAME`.
    pub type_name: &'static str,
    /// The protobuf encoding of the sample.
    pub encoded: Vec<u8>,
    /// Decodes bytes as this event type and says whether they equal the sample.
    pub decodes_to_sample: fn(&[u8]) -> Result<bool, prost::DecodeError>,
}

macro_rules! sample {
    ($ty:ty, $value:expr) => {{
        fn value() -> $ty {
            $value
        }
        fn decodes_to_sample(bytes: &[u8]) -> Result<bool, prost::DecodeError> {
            Ok(<$ty as prost::Message>::decode(bytes)? == value())
        }
        Sample {
            type_name: <$ty as shop_contracts::Event>::TYPE_NAME,
            encoded: prost::Message::encode_to_vec(&value()),
            decodes_to_sample,
        }
    }};
}

/// A sample of every event type of the system.
pub fn all() -> Vec<Sample> {
    vec![
        sample!(
            user::UserCreated,
            user::UserCreated {
                user_id: USER_ID.to_owned(),
                version: 1,
                email: "ada@example.com".to_owned(),
                name: "Ada Lovelace".to_owned(),
                occurred_at: at(1_764_000_000),
            }
        ),
        sample!(
            user::UserUpdated,
            user::UserUpdated {
                user_id: USER_ID.to_owned(),
                version: 2,
                email: "ada@example.org".to_owned(),
                name: "Ada King".to_owned(),
                occurred_at: at(1_764_000_060),
            }
        ),
        sample!(
            user::UserDeleted,
            user::UserDeleted {
                user_id: USER_ID.to_owned(),
                version: 3,
                occurred_at: at(1_764_000_120),
            }
        ),
        sample!(
            user::UserSnapshot,
            user::UserSnapshot {
                user_id: USER_ID.to_owned(),
                version: 2,
                email: "ada@example.org".to_owned(),
                name: "Ada King".to_owned(),
                deleted: false,
                occurred_at: at(1_764_000_090),
            }
        ),
        sample!(
            order::OrderCreated,
            order::OrderCreated {
                order_id: ORDER_ID.to_owned(),
                version: 1,
                user_id: USER_ID.to_owned(),
                items: vec![
                    order::OrderItem {
                        product_id: "sku-0001".to_owned(),
                        quantity: 2,
                    },
                    order::OrderItem {
                        product_id: "sku-0042".to_owned(),
                        quantity: 1,
                    },
                ],
                occurred_at: at(1_764_000_030),
            }
        ),
        sample!(
            order::OrderCancelled,
            order::OrderCancelled {
                order_id: ORDER_ID.to_owned(),
                version: 2,
                user_id: USER_ID.to_owned(),
                occurred_at: at(1_764_000_090),
            }
        ),
    ]
}
