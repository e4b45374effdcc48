-- Kith memory, schema 2: messages get a sealed embedding for recall, like memories.
-- Both embedding columns hold an int8 vector with its f32 scale (see recall.rs), sealed.
ALTER TABLE messages ADD COLUMN embedding_sealed BLOB;
