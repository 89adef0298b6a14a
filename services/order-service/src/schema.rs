//! Tables of the order service's database (see `migrations/order-service`).
//! `outbox` is in `shop_outbox::schema`, `inbox` in `shop_messaging::inbox`.

diesel::table! {
    known_users (user_id) {
        user_id -> Uuid,
        version -> BigInt,
        deleted -> Bool,
        updated_at -> Timestamptz,
    }
}

diesel::table! {
    orders (id) {
        id -> Uuid,
        user_id -> Uuid,
        status -> Text,
        version -> BigInt,
        created_at -> Timestamptz,
        updated_at -> Timestamptz,
    }
}

diesel::table! {
    order_items (order_id, line) {
        order_id -> Uuid,
        line -> SmallInt,
        product_id -> Text,
        quantity -> Integer,
    }
}

diesel::table! {
    create_order_requests (request_id) {
        request_id -> Uuid,
        order_id -> Uuid,
        fingerprint -> Text,
        created_at -> Timestamptz,
    }
}

diesel::joinable!(order_items -> orders (order_id));
diesel::allow_tables_to_appear_in_same_query!(orders, order_items);
