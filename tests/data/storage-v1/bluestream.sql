BEGIN TRANSACTION;
CREATE TABLE datum (
        tenant TEXT NOT NULL, doc_key TEXT NOT NULL, uid TEXT, run_start TEXT,
        parent TEXT, time REAL,  doc TEXT NOT NULL,
        PRIMARY KEY (tenant, doc_key));
CREATE TABLE event_descriptor (
        tenant TEXT NOT NULL, doc_key TEXT NOT NULL, uid TEXT, run_start TEXT,
        parent TEXT, time REAL,  doc TEXT NOT NULL,
        PRIMARY KEY (tenant, doc_key));
INSERT INTO "event_descriptor" VALUES('v1','a1000003-0000-4000-8000-000000000000','a1000003-0000-4000-8000-000000000000','a1000001-0000-4000-8000-000000000000',NULL,1700000000.25,'{"configuration": {}, "data_keys": {"slit": {"dtype": "number", "shape": [], "source": "sim:slit", "units": "mm"}}, "hints": {}, "name": "baseline", "object_classes": {}, "object_keys": {}, "run_start": "a1000001-0000-4000-8000-000000000000", "time": 1700000000.25, "uid": "a1000003-0000-4000-8000-000000000000"}');
INSERT INTO "event_descriptor" VALUES('v1','a1000002-0000-4000-8000-000000000000','a1000002-0000-4000-8000-000000000000','a1000001-0000-4000-8000-000000000000',NULL,1700000000.5,'{"configuration": {}, "data_keys": {"det": {"dtype": "number", "shape": [], "source": "sim:det", "units": "counts"}, "mode": {"dtype": "string", "shape": [], "source": "sim:mode"}, "n": {"dtype": "integer", "shape": [], "source": "sim:n"}}, "hints": {}, "name": "primary", "object_classes": {}, "object_keys": {}, "run_start": "a1000001-0000-4000-8000-000000000000", "time": 1700000000.5, "uid": "a1000002-0000-4000-8000-000000000000"}');
INSERT INTO "event_descriptor" VALUES('v1','b2000002-0000-4000-8000-000000000000','b2000002-0000-4000-8000-000000000000','b2000001-0000-4000-8000-000000000000',NULL,1700000100.5,'{"configuration": {}, "data_keys": {"cam": {"dtype": "array", "dtype_numpy": "<u2", "shape": [6, 8], "source": "sim:cam"}, "temp": {"dtype": "number", "shape": [], "source": "sim:temp", "units": "K"}}, "hints": {}, "name": "primary", "object_classes": {}, "object_keys": {}, "run_start": "b2000001-0000-4000-8000-000000000000", "time": 1700000100.5, "uid": "b2000002-0000-4000-8000-000000000000"}');
INSERT INTO "event_descriptor" VALUES('v1','c3000002-0000-4000-8000-000000000000','c3000002-0000-4000-8000-000000000000','c3000001-0000-4000-8000-000000000000',NULL,1700000200.5,'{"configuration": {}, "data_keys": {"det": {"dtype": "number", "shape": [], "source": "sim:det"}, "motor": {"dtype": "number", "shape": [], "source": "sim:motor", "units": "mm"}}, "hints": {}, "name": "primary", "object_classes": {}, "object_keys": {}, "run_start": "c3000001-0000-4000-8000-000000000000", "time": 1700000200.5, "uid": "c3000002-0000-4000-8000-000000000000"}');
CREATE TABLE event_stream (
        tenant TEXT NOT NULL, descriptor_uid TEXT NOT NULL, run_start TEXT NOT NULL,
        stream_name TEXT NOT NULL, zarr_path TEXT NOT NULL, length INTEGER NOT NULL,
        seq_num_min INTEGER NOT NULL, seq_num_max INTEGER NOT NULL,
        time_min REAL NOT NULL, time_max REAL NOT NULL, data_keys TEXT NOT NULL,
        schema_version INTEGER NOT NULL,
        PRIMARY KEY (tenant, descriptor_uid));
INSERT INTO "event_stream" VALUES('v1','a1000003-0000-4000-8000-000000000000','a1000001-0000-4000-8000-000000000000','baseline','v1/a1/a1000001-0000-4000-8000-000000000000/a1000003-0000-4000-8000-000000000000',2,1,2,1700000000.3,1700000006.0,'["slit"]',1);
INSERT INTO "event_stream" VALUES('v1','c3000002-0000-4000-8000-000000000000','c3000001-0000-4000-8000-000000000000','primary','v1/c3/c3000001-0000-4000-8000-000000000000/c3000002-0000-4000-8000-000000000000',4,1,4,1700000201.0,1700000204.0,'["det", "motor"]',1);
INSERT INTO "event_stream" VALUES('v1','b2000002-0000-4000-8000-000000000000','b2000001-0000-4000-8000-000000000000','primary','v1/b2/b2000001-0000-4000-8000-000000000000/b2000002-0000-4000-8000-000000000000',3,1,3,1700000101.0,1700000103.0,'["cam", "temp"]',1);
INSERT INTO "event_stream" VALUES('v1','a1000002-0000-4000-8000-000000000000','a1000001-0000-4000-8000-000000000000','primary','v1/a1/a1000001-0000-4000-8000-000000000000/a1000002-0000-4000-8000-000000000000',5,1,5,1700000001.0,1700000005.0,'["det", "mode", "n"]',1);
CREATE TABLE ingest_log (
        tenant TEXT NOT NULL, run_start TEXT NOT NULL, topic TEXT NOT NULL,
        partition INTEGER NOT NULL, offset_min INTEGER NOT NULL,
        offset_max INTEGER NOT NULL, daemon_version TEXT NOT NULL, host TEXT NOT NULL,
        extra TEXT NOT NULL,
        PRIMARY KEY (tenant, run_start, topic, partition));
INSERT INTO "ingest_log" VALUES('v1','a1000001-0000-4000-8000-000000000000','file:tests/data/storage-v1/documents.jsonl',0,1,11,'0.1.0','vm','{}');
INSERT INTO "ingest_log" VALUES('v1','b2000001-0000-4000-8000-000000000000','file:tests/data/storage-v1/documents.jsonl',0,12,17,'0.1.0','vm','{}');
INSERT INTO "ingest_log" VALUES('v1','c3000001-0000-4000-8000-000000000000','file:tests/data/storage-v1/documents.jsonl',0,18,21,'0.1.0','vm','{}');
CREATE TABLE resource (
        tenant TEXT NOT NULL, doc_key TEXT NOT NULL, uid TEXT, run_start TEXT,
        parent TEXT, time REAL,  doc TEXT NOT NULL,
        PRIMARY KEY (tenant, doc_key));
CREATE TABLE run_start (
        tenant TEXT NOT NULL, doc_key TEXT NOT NULL, uid TEXT, run_start TEXT,
        parent TEXT, time REAL, scan_id INTEGER, search_text TEXT NOT NULL, query_doc TEXT NOT NULL, doc TEXT NOT NULL,
        PRIMARY KEY (tenant, doc_key));
INSERT INTO "run_start" VALUES('v1','a1000001-0000-4000-8000-000000000000','a1000001-0000-4000-8000-000000000000','a1000001-0000-4000-8000-000000000000',NULL,1700000000.0,101,'count fixture scalar run si a1000001-0000-4000-8000-000000000000','{"plan_name": "count", "purpose": "fixture scalar run", "sample": {"name": "Si"}, "scan_id": 101, "time": 1700000000.0, "uid": "a1000001-0000-4000-8000-000000000000"}','{"plan_name": "count", "purpose": "fixture scalar run", "sample": {"name": "Si"}, "scan_id": 101, "time": 1700000000.0, "uid": "a1000001-0000-4000-8000-000000000000"}');
INSERT INTO "run_start" VALUES('v1','b2000001-0000-4000-8000-000000000000','b2000001-0000-4000-8000-000000000000','b2000001-0000-4000-8000-000000000000',NULL,1700000100.0,102,'count ge b2000001-0000-4000-8000-000000000000','{"plan_name": "count", "sample": {"name": "Ge"}, "scan_id": 102, "time": 1700000100.0, "uid": "b2000001-0000-4000-8000-000000000000"}','{"plan_name": "count", "sample": {"name": "Ge"}, "scan_id": 102, "time": 1700000100.0, "uid": "b2000001-0000-4000-8000-000000000000"}');
INSERT INTO "run_start" VALUES('v1','c3000001-0000-4000-8000-000000000000','c3000001-0000-4000-8000-000000000000','c3000001-0000-4000-8000-000000000000',NULL,1700000200.0,103,'motor scan c3000001-0000-4000-8000-000000000000','{"motors": ["motor"], "plan_name": "scan", "scan_id": 103, "time": 1700000200.0, "uid": "c3000001-0000-4000-8000-000000000000"}','{"motors": ["motor"], "plan_name": "scan", "scan_id": 103, "time": 1700000200.0, "uid": "c3000001-0000-4000-8000-000000000000"}');
CREATE TABLE run_stop (
        tenant TEXT NOT NULL, doc_key TEXT NOT NULL, uid TEXT, run_start TEXT,
        parent TEXT, time REAL,  doc TEXT NOT NULL,
        PRIMARY KEY (tenant, doc_key));
INSERT INTO "run_stop" VALUES('v1','a1000001-0000-4000-8000-000000000000','a1000006-0000-4000-8000-000000000000','a1000001-0000-4000-8000-000000000000',NULL,1700000007.0,'{"exit_status": "success", "num_events": {"baseline": 2, "primary": 5}, "reason": "", "run_start": "a1000001-0000-4000-8000-000000000000", "time": 1700000007.0, "uid": "a1000006-0000-4000-8000-000000000000"}');
INSERT INTO "run_stop" VALUES('v1','b2000001-0000-4000-8000-000000000000','b2000006-0000-4000-8000-000000000000','b2000001-0000-4000-8000-000000000000',NULL,1700000105.0,'{"exit_status": "success", "num_events": {"primary": 3}, "reason": "", "run_start": "b2000001-0000-4000-8000-000000000000", "time": 1700000105.0, "uid": "b2000006-0000-4000-8000-000000000000"}');
INSERT INTO "run_stop" VALUES('v1','c3000001-0000-4000-8000-000000000000','c3000006-0000-4000-8000-000000000000','c3000001-0000-4000-8000-000000000000',NULL,1700000206.0,'{"exit_status": "success", "num_events": {"primary": 4}, "reason": "", "run_start": "c3000001-0000-4000-8000-000000000000", "time": 1700000206.0, "uid": "c3000006-0000-4000-8000-000000000000"}');
CREATE TABLE stream_datum (
        tenant TEXT NOT NULL, doc_key TEXT NOT NULL, uid TEXT, run_start TEXT,
        parent TEXT, time REAL,  doc TEXT NOT NULL,
        PRIMARY KEY (tenant, doc_key));
CREATE TABLE stream_resource (
        tenant TEXT NOT NULL, doc_key TEXT NOT NULL, uid TEXT, run_start TEXT,
        parent TEXT, time REAL,  doc TEXT NOT NULL,
        PRIMARY KEY (tenant, doc_key));
CREATE INDEX run_start_run_start ON run_start (tenant, run_start, time, doc_key);
CREATE INDEX run_start_time ON run_start (tenant, time DESC, uid);
CREATE INDEX run_start_scan_id ON run_start (tenant, scan_id);
CREATE INDEX run_stop_run_start ON run_stop (tenant, run_start, time, doc_key);
CREATE UNIQUE INDEX run_stop_uid ON run_stop (tenant, uid);
CREATE INDEX event_descriptor_run_start ON event_descriptor (tenant, run_start, time, doc_key);
CREATE INDEX resource_run_start ON resource (tenant, run_start, time, doc_key);
CREATE INDEX datum_run_start ON datum (tenant, run_start, time, doc_key);
CREATE INDEX datum_parent ON datum (tenant, parent, time, doc_key);
CREATE INDEX stream_resource_run_start ON stream_resource (tenant, run_start, time, doc_key);
CREATE INDEX stream_datum_run_start ON stream_datum (tenant, run_start, time, doc_key);
CREATE INDEX stream_datum_parent ON stream_datum (tenant, parent, time, doc_key);
CREATE INDEX event_stream_run_start ON event_stream (tenant, run_start);
COMMIT;
