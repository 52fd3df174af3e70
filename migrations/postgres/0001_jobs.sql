-- Jobs of the impasto daemon (PostgreSQL). Times are Unix milliseconds.
CREATE TABLE jobs (
    id                TEXT PRIMARY KEY,
    content_hash      TEXT NOT NULL,
    profile_key       TEXT NOT NULL,
    watch             TEXT NOT NULL,
    name              TEXT NOT NULL,
    input_path        TEXT NOT NULL,
    output_path       TEXT NOT NULL,
    state             TEXT NOT NULL,
    attempts          BIGINT NOT NULL DEFAULT 0,
    last_error        TEXT,
    frames_done       BIGINT NOT NULL DEFAULT 0,
    frames_total      BIGINT NOT NULL DEFAULT 0,
    resumed_frames    BIGINT NOT NULL DEFAULT 0,
    seconds_per_frame DOUBLE PRECISION,
    device            TEXT,
    node              TEXT,
    created_ms        BIGINT NOT NULL,
    started_ms        BIGINT,
    finished_ms       BIGINT,
    not_before_ms     BIGINT NOT NULL DEFAULT 0,
    heartbeat_ms      BIGINT,
    cancel_requested  BIGINT NOT NULL DEFAULT 0,
    thumbnail         BYTEA,
    thumbnail_version BIGINT,
    UNIQUE (content_hash, profile_key)
);
CREATE INDEX jobs_queue ON jobs (state, not_before_ms, created_ms);
