-- Kith memory, schema 1. Every `*_sealed` column is XChaCha20-Poly1305 ciphertext bound to
-- (table, column, row id); everything else is listed in ARCHITECTURE.md as what leaks.

CREATE TABLE conversations (
    id          INTEGER PRIMARY KEY,
    created_at  INTEGER NOT NULL,  -- unix milliseconds
    updated_at  INTEGER NOT NULL,
    -- JSON {"title", "model", "ran_on"} sealed together.
    meta_sealed BLOB    NOT NULL
);

CREATE TABLE messages (
    id              INTEGER PRIMARY KEY,
    conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    created_at      INTEGER NOT NULL,
    prompt_tokens   INTEGER NOT NULL DEFAULT 0,
    output_tokens   INTEGER NOT NULL DEFAULT 0,
    duration_ms     INTEGER NOT NULL DEFAULT 0,
    -- JSON {"role", "content", "ran_on"} sealed together.
    body_sealed     BLOB    NOT NULL
);
CREATE INDEX messages_by_conversation ON messages(conversation_id, id);

CREATE TABLE memories (
    id                INTEGER PRIMARY KEY,
    created_at        INTEGER NOT NULL,
    pinned            INTEGER NOT NULL DEFAULT 0,
    source_message_id INTEGER REFERENCES messages(id) ON DELETE SET NULL,
    text_sealed       BLOB    NOT NULL,
    -- f32 little-endian vector, sealed; NULL until embedded.
    embedding_sealed  BLOB
);

CREATE TABLE settings (
    id           INTEGER PRIMARY KEY,
    key          TEXT    NOT NULL UNIQUE,  -- setting names are not personal, values are
    value_sealed BLOB    NOT NULL
);
