"""PostgreSQL schema and migrations, applied in order and recorded.

Migrations only ever append: an applied one is never edited, a change is a new
entry. `migrate` is idempotent and safe to run from several processes at once
(an advisory lock serialises them).
"""

from __future__ import annotations

import psycopg

MIGRATIONS: list[tuple[int, str, str]] = [
    (
        1,
        "api keys and request log",
        """
        CREATE TABLE api_keys (
            id          text PRIMARY KEY,
            name        text NOT NULL,
            key_hash    bytea NOT NULL UNIQUE,      -- sha256 of the full key; the key itself is never stored
            key_prefix  text NOT NULL,              -- first characters, to recognise a key in listings
            groups      text[] NOT NULL DEFAULT '{}',
            rpm         integer CHECK (rpm IS NULL OR rpm > 0),
            created_at  timestamptz NOT NULL DEFAULT now(),
            revoked_at  timestamptz
        );
        CREATE TABLE request_log (
            id                          bigserial PRIMARY KEY,
            ts                          timestamptz NOT NULL,
            request_id                  text NOT NULL,
            key_id                      text,
            principal                   text,
            model                       text,
            method                      text NOT NULL,
            path                        text NOT NULL,
            status                      integer NOT NULL,
            input_tokens                bigint NOT NULL DEFAULT 0,
            output_tokens               bigint NOT NULL DEFAULT 0,
            cache_creation_input_tokens bigint NOT NULL DEFAULT 0,
            cache_read_input_tokens     bigint NOT NULL DEFAULT 0,
            latency_ms                  double precision,
            upstream_cluster            text,
            response_flags              text,
            bytes_received              bigint,
            bytes_sent                  bigint
        );
        CREATE INDEX request_log_ts ON request_log (ts);
        CREATE INDEX request_log_key ON request_log (key_id, ts);
        CREATE UNIQUE INDEX request_log_request_id ON request_log (request_id);
        """,
    ),
    (
        2,
        "request log: unknown usage is NULL with a status and reason; the client's request id kept aside",
        """
        -- A count that was not read is NULL, never a default 0; usage_status says how the
        -- counts were obtained (ccr.contract.UsageStatus) and usage_note why, when not complete.
        ALTER TABLE request_log
            ALTER COLUMN input_tokens DROP NOT NULL,
            ALTER COLUMN input_tokens DROP DEFAULT,
            ALTER COLUMN output_tokens DROP NOT NULL,
            ALTER COLUMN output_tokens DROP DEFAULT,
            ALTER COLUMN cache_creation_input_tokens DROP NOT NULL,
            ALTER COLUMN cache_creation_input_tokens DROP DEFAULT,
            ALTER COLUMN cache_read_input_tokens DROP NOT NULL,
            ALTER COLUMN cache_read_input_tokens DROP DEFAULT,
            -- NULL only on rows written before this migration.
            ADD COLUMN usage_status text CHECK (usage_status IN
                ('complete', 'partial', 'estimated', 'not_billable', 'unknown', 'not_forwarded')),
            ADD COLUMN usage_note text,
            -- request_id is the gateway's own (unique); what the client sent is informational.
            ADD COLUMN client_request_id text;
        CREATE INDEX request_log_client_request_id ON request_log (client_request_id)
            WHERE client_request_id IS NOT NULL;
        """,
    ),
    (
        3,
        "keys for machines (owner, tenant, expiry, last use, rotation) and the admin log",
        """
        ALTER TABLE api_keys
            ADD COLUMN owner        text,
            ADD COLUMN tenant       text,
            ADD COLUMN expires_at   timestamptz,            -- refused from this instant on
            ADD COLUMN last_used_at timestamptz,            -- batched by extauth, at most every few seconds
            ADD COLUMN replaced_by  text REFERENCES api_keys (id);  -- set by rotation
        -- One row per admin change, written in the same transaction as the change itself.
        CREATE TABLE admin_log (
            id      bigserial PRIMARY KEY,
            ts      timestamptz NOT NULL DEFAULT now(),
            actor   text NOT NULL,
            action  text NOT NULL,
            target  text NOT NULL,
            before  jsonb,
            after   jsonb
        );
        CREATE INDEX admin_log_target ON admin_log (target, ts);
        """,
    ),
    (
        4,
        "provider objects (batches, files) owned by principals",
        """
        -- Objects that live at a provider behind the shared credential; each belongs to the
        -- principal that created it (recorded by the adapter when the create reply comes back).
        CREATE TABLE provider_objects (
            kind                text NOT NULL CHECK (kind IN ('batch', 'file')),
            object_id           text NOT NULL,
            provider            text NOT NULL,
            owner_principal_id  text NOT NULL,
            created_at          timestamptz NOT NULL DEFAULT now(),
            request_count       integer,        -- batches: requests in the batch
            metered_at          timestamptz,    -- batches: results fetched and metered (first fetch only)
            deleted_at          timestamptz,
            PRIMARY KEY (kind, object_id)
        );
        CREATE INDEX provider_objects_owner ON provider_objects (owner_principal_id, kind, created_at);
        """,
    ),
    (
        5,
        "sign-in sessions",
        """
        CREATE TABLE signin_sessions (
            id                  text PRIMARY KEY,        -- the session tokens' sid
            idp_issuer          text NOT NULL,
            subject             text NOT NULL,           -- the IdP's sub
            name                text NOT NULL,
            groups              text[] NOT NULL DEFAULT '{}',
            tenant              text,
            flow                text NOT NULL CHECK (flow IN ('device', 'browser', 'cli-browser')),
            -- sha256 of the gateway refresh token now valid, and of the one it replaced
            -- (presenting a replaced one again revokes the session: it was copied).
            refresh_hash        bytea UNIQUE,
            prev_refresh_hash   bytea,
            -- The IdP's refresh token, AES-256-GCM sealed with the sign-in service's key.
            idp_refresh_sealed  bytea,
            -- One-time code handed to `ccr login --browser` on its loopback redirect,
            -- redeemable once, before it expires, with the PKCE verifier of its challenge.
            handoff_hash        bytea UNIQUE,
            handoff_challenge   text,
            handoff_expires_at  timestamptz,
            created_at          timestamptz NOT NULL DEFAULT now(),
            refreshed_at        timestamptz NOT NULL DEFAULT now(),
            expires_at          timestamptz NOT NULL,    -- no refresh after this, whatever the IdP says
            revoked_at          timestamptz,
            revoked_reason      text
        );
        CREATE INDEX signin_sessions_subject ON signin_sessions (idp_issuer, subject);
        CREATE INDEX signin_sessions_prev_refresh ON signin_sessions (prev_refresh_hash);
        """,
    ),
    (
        6,
        "policy decision log",
        """
        -- One row per decision extauth makes (extauth/decisions.py), written in batches off the
        -- hot path. request_id is Envoy's x-request-id: it joins request_log.request_id.
        CREATE TABLE policy_decisions (
            decision_id     text PRIMARY KEY,        -- dec_...: also in the denial message and AUTHZ_NS
            ts              timestamptz NOT NULL,
            request_id      text,                    -- NULL only when Envoy sent none
            phase           text NOT NULL CHECK (phase IN ('full', 'identity')),
            principal_id    text,                    -- NULL when refused before authentication
            principal_name  text,
            principal_kind  text,
            endpoint        text,
            method          text NOT NULL,
            path            text NOT NULL,           -- without the query string
            model           text,
            input_sha256    text,                    -- canonical policy input; NULL when the policy did not run
            bundle_revision text,
            bundle_digest   text,
            allow           boolean NOT NULL,
            status          integer NOT NULL,        -- the HTTP status extauth answered (200 = allowed)
            reason          text NOT NULL,
            eval_us         integer                  -- policy evaluation time; NULL when it did not run
        );
        CREATE INDEX policy_decisions_request_id ON policy_decisions (request_id);
        CREATE INDEX policy_decisions_ts ON policy_decisions (ts);
        """,
    ),
    (
        7,
        "spend: ledger of every request's cost, budgets (changes go to admin_log)",
        """
        -- One row per request that reached a decision, written by the access-log receiver
        -- (audit/ledger.py); the truth behind the Redis budget counters. Money in micro-USD.
        CREATE TABLE spend_ledger (
            request_id          text PRIMARY KEY,       -- the gateway's x-request-id (request_log)
            ts                  timestamptz NOT NULL,   -- request start: the period it is charged to
            principal_id        text NOT NULL,
            principal           text,
            principal_kind      text,
            key_id              text,
            tenant              text,
            groups              text[] NOT NULL DEFAULT '{}',
            spiffe_id           text,
            model               text,
            endpoint            text,
            status              integer NOT NULL,
            usage_status        text,
            input_tokens        bigint,
            output_tokens       bigint,
            cache_write_5m_tokens bigint,
            cache_write_1h_tokens bigint,
            cache_read_tokens   bigint,
            batch               boolean NOT NULL DEFAULT false,
            cost_micro_usd      bigint NOT NULL CHECK (cost_micro_usd >= 0),
            reserved_micro_usd  bigint                  -- what admission reserved; NULL when nothing
        );
        CREATE INDEX spend_ledger_ts ON spend_ledger (ts);
        CREATE INDEX spend_ledger_principal ON spend_ledger (principal_id, ts);
        CREATE INDEX spend_ledger_key ON spend_ledger (key_id, ts) WHERE key_id IS NOT NULL;
        CREATE INDEX spend_ledger_tenant ON spend_ledger (tenant, ts) WHERE tenant IS NOT NULL;
        CREATE INDEX spend_ledger_groups ON spend_ledger USING gin (groups);
        -- USD budgets, managed at runtime (`ccr budgets set|remove`); every change is an admin_log row.
        CREATE TABLE budgets (
            name            text PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$'),
            subject_kind    text NOT NULL CHECK (subject_kind IN ('tenant', 'group', 'user', 'spiffe', 'key')),
            subject         text NOT NULL,
            period          text NOT NULL CHECK (period IN ('day', 'week', 'month')),
            amount_micro_usd bigint NOT NULL CHECK (amount_micro_usd >= 0),
            mode            text NOT NULL CHECK (mode IN ('hard', 'soft')),
            -- group and tenant budgets: one pool for all members, or the amount for each member
            scope           text NOT NULL CHECK (scope IN ('shared', 'per_seat', 'single')),
            on_redis_down   text NOT NULL CHECK (on_redis_down IN ('open', 'closed')),
            timezone        text,                   -- NULL: spend.timezone
            created_at      timestamptz NOT NULL DEFAULT now(),
            updated_at      timestamptz NOT NULL DEFAULT now(),
            CHECK ((subject_kind IN ('group', 'tenant')) = (scope <> 'single'))
        );
        """,
    ),
    (
        8,
        "policy sets and shadow decisions",
        """
        -- Which policy set a row is about ('global': policy.dir / policy.bundle; else a policy.sets name),
        -- and whether it was a shadow evaluation: logged, never enforced (its allow is the would-be result).
        ALTER TABLE policy_decisions ADD COLUMN policy_set text NOT NULL DEFAULT 'global';
        ALTER TABLE policy_decisions ADD COLUMN shadow boolean NOT NULL DEFAULT false;
        CREATE INDEX policy_decisions_shadow_denials ON policy_decisions (policy_set, ts) WHERE shadow AND NOT allow;
        """,
    ),
    (
        9,
        "audit: hash chains, signed checkpoints, an insert-only writer role",
        """
        -- Every request_log / admin_log row is a link of a hash chain (audit/chain.py,
        -- docs/audit.md). NULL chain columns: a row written before this migration.
        CREATE TABLE audit_chains (
            chain_id    text PRIMARY KEY,
            log_table   text NOT NULL CHECK (log_table IN ('request_log', 'admin_log')),
            columns     text[] NOT NULL,        -- the columns each link's hash covers, in order
            started_at  timestamptz NOT NULL DEFAULT now(),
            host        text,
            pid         integer
        );
        INSERT INTO audit_chains (chain_id, log_table, columns)
            VALUES ('admin', 'admin_log', ARRAY['id', 'ts', 'actor', 'action', 'target', 'before', 'after']);
        ALTER TABLE request_log
            ADD COLUMN chain_id  text REFERENCES audit_chains (chain_id),
            ADD COLUMN chain_seq bigint,
            ADD COLUMN prev_hash bytea,
            ADD COLUMN row_hash  bytea;
        CREATE UNIQUE INDEX request_log_chain ON request_log (chain_id, chain_seq);
        ALTER TABLE admin_log
            ADD COLUMN chain_id  text REFERENCES audit_chains (chain_id),
            ADD COLUMN chain_seq bigint,
            ADD COLUMN prev_hash bytea,
            ADD COLUMN row_hash  bytea;
        CREATE UNIQUE INDEX admin_log_chain ON admin_log (chain_id, chain_seq);
        -- Rows that predate the chains: verify reports them as not covered, not as tampering.
        CREATE TABLE audit_unchained_before (
            log_table   text PRIMARY KEY,
            max_id      bigint NOT NULL
        );
        INSERT INTO audit_unchained_before
            SELECT 'request_log', coalesce(max(id), 0) FROM request_log
            UNION ALL SELECT 'admin_log', coalesce(max(id), 0) FROM admin_log;
        -- A writer's signed statement of its chain's head (Ed25519, audit/chain.py).
        CREATE TABLE audit_checkpoints (
            id          bigserial PRIMARY KEY,
            ts          timestamptz NOT NULL,
            log_table   text NOT NULL,
            chain_id    text NOT NULL REFERENCES audit_chains (chain_id),
            chain_seq   bigint NOT NULL,
            row_hash    bytea NOT NULL,
            key_id      text NOT NULL,
            signature   bytea NOT NULL,
            UNIQUE (chain_id, chain_seq)
        );

        -- Second line of defence behind the grants: no row of the audit tables changes or
        -- goes away, whoever asks (an owner must disable the trigger first, which verify catches).
        CREATE FUNCTION audit_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $fn$
        BEGIN
            RAISE EXCEPTION 'audit table %: % is not allowed (append-only)', TG_TABLE_NAME, TG_OP
                USING ERRCODE = 'insufficient_privilege';
        END
        $fn$;
        CREATE TRIGGER request_log_append_only BEFORE UPDATE OR DELETE ON request_log
            FOR EACH ROW EXECUTE FUNCTION audit_refuse_change();
        CREATE TRIGGER request_log_no_truncate BEFORE TRUNCATE ON request_log
            FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse_change();
        CREATE TRIGGER admin_log_append_only BEFORE UPDATE OR DELETE ON admin_log
            FOR EACH ROW EXECUTE FUNCTION audit_refuse_change();
        CREATE TRIGGER admin_log_no_truncate BEFORE TRUNCATE ON admin_log
            FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse_change();
        CREATE TRIGGER audit_checkpoints_append_only BEFORE UPDATE OR DELETE ON audit_checkpoints
            FOR EACH ROW EXECUTE FUNCTION audit_refuse_change();
        CREATE TRIGGER audit_checkpoints_no_truncate BEFORE TRUNCATE ON audit_checkpoints
            FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse_change();
        CREATE TRIGGER audit_chains_append_only BEFORE UPDATE OR DELETE ON audit_chains
            FOR EACH ROW EXECUTE FUNCTION audit_refuse_change();
        CREATE TRIGGER audit_chains_no_truncate BEFORE TRUNCATE ON audit_chains
            FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse_change();

        -- The role the access-log receiver connects as (ccr/audit_role.py gives it a password
        -- when ccr manages PostgreSQL): read and append, nothing else. Roles are per server,
        -- so another database's migration may have created it already.
        DO $do$
        BEGIN
            CREATE ROLE ccr_audit_writer NOLOGIN;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL;
        END
        $do$;
        REVOKE ALL ON request_log, admin_log, audit_chains, audit_checkpoints, audit_unchained_before
            FROM PUBLIC, ccr_audit_writer;
        GRANT SELECT, INSERT ON request_log, audit_chains, audit_checkpoints TO ccr_audit_writer;
        GRANT SELECT ON admin_log, audit_unchained_before TO ccr_audit_writer;
        GRANT USAGE ON SEQUENCE request_log_id_seq, audit_checkpoints_id_seq TO ccr_audit_writer;
        """,
    ),
    (
        10,
        "spend: the audit writer role appends to the spend ledger",
        """
        -- The access-log receiver, connected as ccr_audit_writer (migration 9), writes each request's
        -- cost (audit/ledger.py: INSERT ... ON CONFLICT (request_id) DO NOTHING, also when replaying
        -- its spool). spend_ledger has no sequence (keyed by request id); settlement is in Redis.
        -- Nothing else: budgets are changed by `ccr budgets` (admin DSN), never by the receiver.
        REVOKE ALL ON spend_ledger, budgets FROM PUBLIC, ccr_audit_writer;
        GRANT SELECT, INSERT ON spend_ledger TO ccr_audit_writer;
        """,
    ),
    (
        11,
        "audit: what a request_log row holds (principal, source, provider, errors, cost, timing, policy)",
        """
        -- audit/entry.py DETAIL_COLUMNS, filled from Envoy's own fields and the gateway's dynamic
        -- metadata, never from client headers. A chain registered before this migration covers the
        -- older columns only (audit_chains.columns), so its links still verify; new chains cover these.
        ALTER TABLE request_log
            ADD COLUMN principal_id          text,
            ADD COLUMN principal_kind        text,
            ADD COLUMN groups                text[],
            ADD COLUMN tenant                text,
            ADD COLUMN spiffe_id             text,
            ADD COLUMN source_address        text,     -- the downstream peer's address (the TCP connection)
            ADD COLUMN endpoint              text,     -- extauth's endpoint name (messages.create, ...)
            ADD COLUMN model_served          text,     -- the serving provider's id of the model asked
            ADD COLUMN provider              text,     -- providers[].name that served the last attempt
            ADD COLUMN region                text,     -- that provider's region
            ADD COLUMN attempts              integer,  -- upstream attempts (retries and failovers included)
            ADD COLUMN error_type            text,     -- the Anthropic error type of a failed request
            ADD COLUMN error_kind            text,     -- who failed it: denied, rate_limited, budget, client, ...
            ADD COLUMN cache_write_5m_tokens bigint,
            ADD COLUMN cache_write_1h_tokens bigint,
            ADD COLUMN cost_micro_usd        bigint CHECK (cost_micro_usd IS NULL OR cost_micro_usd >= 0),
            ADD COLUMN ttft_ms               double precision,  -- to the first response byte to the client
            ADD COLUMN decision_id           text,     -- policy_decisions.decision_id
            ADD COLUMN bundle_revision       text,
            ADD COLUMN ratelimit             text CHECK (ratelimit IS NULL OR ratelimit IN
                ('ok', 'over_limit', 'budget', 'error', 'not_checked'));
        CREATE INDEX request_log_principal_id ON request_log (principal_id, ts) WHERE principal_id IS NOT NULL;
        CREATE INDEX request_log_tenant ON request_log (tenant, ts) WHERE tenant IS NOT NULL;
        """,
    ),
    (
        12,
        "audit: request_log partitioned by time (retention drops exported partitions)",
        """
        -- request_log becomes a range-partitioned table on ts (docs/audit.md "Retention"). Its rows are
        -- copied over; ids, the sequence and every chain link are kept as they are, so nothing re-hashes.
        -- Keys must include the partition key: request_id and (chain_id, chain_seq) are unique per ts
        -- (the writer skips a request_id already present; verify walks each chain's seqs in order).
        ALTER SEQUENCE request_log_id_seq OWNED BY NONE;
        ALTER TABLE request_log RENAME TO request_log_unpartitioned;
        CREATE TABLE request_log (LIKE request_log_unpartitioned INCLUDING DEFAULTS INCLUDING CONSTRAINTS)
            PARTITION BY RANGE (ts);
        ALTER SEQUENCE request_log_id_seq OWNED BY request_log.id;
        ALTER TABLE request_log ADD PRIMARY KEY (id, ts),
            ADD FOREIGN KEY (chain_id) REFERENCES audit_chains (chain_id);
        CREATE UNIQUE INDEX request_log_request_id_ts ON request_log (request_id, ts);
        CREATE UNIQUE INDEX request_log_chain_ts ON request_log (chain_id, chain_seq, ts);
        CREATE INDEX request_log_ts_p ON request_log (ts);
        CREATE INDEX request_log_key_p ON request_log (key_id, ts);
        CREATE INDEX request_log_client_request_id_p ON request_log (client_request_id)
            WHERE client_request_id IS NOT NULL;
        CREATE INDEX request_log_principal_id_p ON request_log (principal_id, ts) WHERE principal_id IS NOT NULL;
        CREATE INDEX request_log_tenant_p ON request_log (tenant, ts) WHERE tenant IS NOT NULL;
        -- Row triggers on the parent are cloned onto every partition, present and future; a TRUNCATE of
        -- one partition fires only that partition's statement triggers: audit_add_partition adds one.
        CREATE TRIGGER request_log_append_only BEFORE UPDATE OR DELETE ON request_log
            FOR EACH ROW EXECUTE FUNCTION audit_refuse_change();
        CREATE TRIGGER request_log_no_truncate BEFORE TRUNCATE ON request_log
            FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse_change();

        -- The one way partitions are made (the migration, `ccr audit retain`): the partition refuses
        -- TRUNCATE like its parent, and nobody but the owner has any privilege on it directly.
        CREATE FUNCTION audit_add_partition(p_name text, p_from timestamptz, p_to timestamptz)
        RETURNS void LANGUAGE plpgsql AS $fn$
        BEGIN
            IF p_from IS NULL THEN
                EXECUTE format('CREATE TABLE %I PARTITION OF request_log DEFAULT', p_name);
            ELSE
                EXECUTE format('CREATE TABLE %I PARTITION OF request_log FOR VALUES FROM (%L) TO (%L)',
                               p_name, p_from, p_to);
            END IF;
            EXECUTE format('CREATE TRIGGER %I BEFORE TRUNCATE ON %I FOR EACH STATEMENT'
                           ' EXECUTE FUNCTION audit_refuse_change()', p_name || '_no_truncate', p_name);
            EXECUTE format('REVOKE ALL ON %I FROM PUBLIC, ccr_audit_writer', p_name);
        END
        $fn$;
        REVOKE ALL ON FUNCTION audit_add_partition(text, timestamptz, timestamptz) FROM PUBLIC;
        -- Rows outside every partition's range (a partition not made in time) land here, never fail.
        SELECT audit_add_partition('request_log_default', NULL, NULL);
        -- Monthly partitions (UTC) from the oldest row's month to two months ahead; `ccr audit retain`
        -- makes later ones at the configured granularity.
        DO $do$
        DECLARE
            m timestamptz := date_trunc('month', coalesce(
                (SELECT min(ts) FROM request_log_unpartitioned), now()) AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
            stop timestamptz := (date_trunc('month', now() AT TIME ZONE 'UTC') + interval '3 months')
                AT TIME ZONE 'UTC';
        BEGIN
            WHILE m < stop LOOP
                PERFORM audit_add_partition('request_log_' || to_char(m AT TIME ZONE 'UTC', 'YYYYMMDD'), m,
                                            (m AT TIME ZONE 'UTC' + interval '1 month') AT TIME ZONE 'UTC');
                m := (m AT TIME ZONE 'UTC' + interval '1 month') AT TIME ZONE 'UTC';
            END LOOP;
        END
        $do$;
        INSERT INTO request_log SELECT * FROM request_log_unpartitioned;
        DROP TABLE request_log_unpartitioned;
        REVOKE ALL ON request_log FROM PUBLIC, ccr_audit_writer;
        GRANT SELECT, INSERT ON request_log TO ccr_audit_writer;
        """,
    ),
    (
        13,
        "spend: a batch remembers the request that created it (its budget hold)",
        """
        -- A batch create reserves the whole batch's worst case on the budgets (docs/spend.md); the
        -- hold is keyed by the create's gateway request id and released when the batch's results are
        -- first charged. The adapter records that id with the owner; extauth reads it on results.
        ALTER TABLE provider_objects ADD COLUMN IF NOT EXISTS create_request_id text;
        """,
    ),
    (
        15,
        "request_log: the model as the client named it (model aliases)",
        """
        -- `model` is the concrete model served (an alias resolved, ccr/routing.py); this is the id the
        -- client asked for (the alias, or the same id). Covered by the chains registered from now on.
        ALTER TABLE request_log ADD COLUMN model_requested text;
        """,
    ),
    (
        19,
        "request_body: captured bodies, encrypted (audit.bodies)",
        """
        -- One row per request whose principal or tenant audit.bodies names (docs/audit.md "Bodies").
        -- Ciphertexts are AES-256-GCM under the receiver's key (key_id); the associated data binds
        -- each to request_id and to which body it is. `ccr audit retain` deletes rows past expires_at.
        CREATE TABLE request_body (
            request_id text PRIMARY KEY,
            ts timestamptz NOT NULL,
            expires_at timestamptz NOT NULL,
            key_id text NOT NULL,
            request_nonce bytea NOT NULL,
            request_ct bytea NOT NULL,
            request_bytes bigint NOT NULL,
            request_truncated boolean NOT NULL,
            response_nonce bytea,
            response_ct bytea,
            response_bytes bigint,
            response_truncated boolean
        );
        CREATE INDEX request_body_expires_at ON request_body (expires_at);
        REVOKE ALL ON request_body FROM PUBLIC, ccr_audit_writer;
        -- The receiver appends; it can neither read nor change a body.
        GRANT INSERT ON request_body TO ccr_audit_writer;
        """,
    ),
]

_LOCK_ID = 0x636372  # "ccr"


def migrate(dsn: str) -> int:
    """Apply pending migrations; returns the schema version now in place."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (_LOCK_ID,))
        try:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version integer PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {r[0] for r in conn.execute("SELECT version FROM schema_migrations")}
            for version, name, sql in sorted(MIGRATIONS):  # list order may differ from version order
                if version in done:
                    continue
                with conn.transaction():
                    conn.execute(sql)
                    conn.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)", (version, name)
                    )
            return max(v for v, _, _ in MIGRATIONS)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_ID,))
