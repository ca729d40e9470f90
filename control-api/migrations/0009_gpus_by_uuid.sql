-- GPUs are keyed by what identifies them across reboots. Indexes can change when a host
-- reboots or its driver reloads; the UUID that nvidia-smi reports does not. A discovered GPU's
-- key is its UUID; a GPU listed by index in configuration (hosts without nvidia-smi) keeps the
-- key "index:<n>". `idx` stays as the GPU's index now (what nodes and CDI modes pass, and what
-- environments.gpus shows), no longer unique: a retired GPU may have left its index to another.
ALTER TABLE gpu_devices ADD COLUMN id text;
UPDATE gpu_devices SET id = 'index:' || idx;
ALTER TABLE gpu_devices ALTER COLUMN id SET NOT NULL;
ALTER TABLE gpu_devices DROP CONSTRAINT gpu_devices_pkey;
ALTER TABLE gpu_devices ADD PRIMARY KEY (id);

-- What discovery reports, shown to admins (GET /api/v1/gpus) and matched by a create's
-- gpu_model.
ALTER TABLE gpu_devices
    ADD COLUMN uuid        text UNIQUE,
    ADD COLUMN name        text NOT NULL DEFAULT '',
    ADD COLUMN memory_mib  bigint CHECK (memory_mib >= 0);

CREATE INDEX gpu_devices_free ON gpu_devices (idx) WHERE status = 'available';
CREATE INDEX gpu_devices_env ON gpu_devices (env_id) WHERE env_id IS NOT NULL;

-- The GPU model an environment asked for (matched against the name, case-insensitively);
-- every start takes GPUs of that model again. NULL: any model.
ALTER TABLE environments ADD COLUMN gpu_model text
    CHECK (gpu_model IS NULL OR length(gpu_model) BETWEEN 1 AND 128);
