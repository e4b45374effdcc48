-- Kith memory, schema 3: memories the node suggests after a turn wait here until the user
-- keeps (or edits) or discards them; they are never recalled while they wait. A candidate
-- goes with the message it came from. Conversations' sealed meta gains "privacy" (JSON,
-- no schema change).
CREATE TABLE memory_candidates (
    id                INTEGER PRIMARY KEY,
    created_at        INTEGER NOT NULL,
    source_message_id INTEGER REFERENCES messages(id) ON DELETE CASCADE,
    text_sealed       BLOB    NOT NULL
);
