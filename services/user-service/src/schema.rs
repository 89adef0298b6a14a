//! Tables of the user service's database (see `migrations/user-service`).
//! The `outbox` table is in `shop_outbox::schema`.

diesel::table! {
    users (id) {
        id -> Uuid,
        email -> Text,
        name -> Text,
        version -> BigInt,
        created_at -> Timestamptz,
        updated_at -> Timestamptz,
    }
}

diesel::table! {
    create_user_requests (request_id) {
        request_id -> Uuid,
        user_id -> Uuid,
        email -> Text,
        name -> Text,
        created_at -> Timestamptz,
    }
}

diesel::table! {
    /// What is kept of a deleted user (no personal data).
    user_tombstones (id) {
        id -> Uuid,
        version -> BigInt,
        deleted_at -> Timestamptz,
    }
}

diesel::allow_tables_to_appear_in_same_query!(users, user_tombstones);
