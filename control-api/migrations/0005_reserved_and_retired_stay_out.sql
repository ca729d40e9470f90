-- A port listed as reserved while an environment holds it, and a GPU removed from the
-- inventory while allocated, used to come back as available when released. Each row now
-- remembers what the configuration says about it, independently of its current status, and
-- every release path honours it.
ALTER TABLE port_pool ADD COLUMN reserved boolean NOT NULL DEFAULT false;
UPDATE port_pool SET reserved = true WHERE status = 'reserved';

ALTER TABLE gpu_devices ADD COLUMN in_inventory boolean NOT NULL DEFAULT true;
UPDATE gpu_devices SET in_inventory = false WHERE status = 'retired';
