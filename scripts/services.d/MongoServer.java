// Local MongoDB-wire server for bluestream development and tests.
//
// Run with the Java 17 single-file source launcher, class path from .services/lib/mongo:
//
//   java -cp '.services/lib/mongo/*' scripts/services.d/MongoServer.java HOST PORT DATAFILE
//
// Serves de.bwaldvogel mongo-java-server with its H2 backend on an MVStore file
// (DATAFILE), so data survives restarts. Blocks until killed; on SIGTERM/SIGINT a
// shutdown hook stops the listener and closes the store (flushing it to disk).
// Started and stopped by scripts/services; not meant to be used directly.
//
// Advertised server version: mongo-java-server 1.47.0 answers "5.0.0" but maxWireVersion 8
// (= MongoDB 4.2), which current PyMongo (>= 4.14 wants 4.2, newer releases 4.4, i.e. wire 9)
// rejects. We advertise MongoDB 4.4 (wire 9) by default; the system property
// bluestream.mongo.version (4.0, 4.2, 4.4, 5.0, 6.0, 7.0) overrides it. Only the handshake
// changes: the command set mongo-java-server implements stays the same.

import java.io.File;
import java.util.List;
import java.util.Map;
import java.util.concurrent.CountDownLatch;

import de.bwaldvogel.mongo.MongoVersion;
import de.bwaldvogel.mongo.backend.h2.H2Backend;

public class MongoServer {

    // MongoDB release -> wire protocol version (as in the MongoDB driver specifications)
    private static final Map<String, Integer> WIRE_VERSIONS = Map.of(
            "4.0", 7, "4.2", 8, "4.4", 9, "5.0", 13, "6.0", 17, "7.0", 21);

    private static MongoVersion advertisedVersion() {
        String name = System.getProperty("bluestream.mongo.version", "4.4");
        Integer wire = WIRE_VERSIONS.get(name);
        if (wire == null) {
            System.err.println("unsupported bluestream.mongo.version " + name + ", use one of " + WIRE_VERSIONS.keySet());
            System.exit(2);
        }
        String[] parts = name.split("\\.");
        List<Integer> array = List.of(Integer.parseInt(parts[0]), Integer.parseInt(parts[1]), 0, 0);
        return new MongoVersion() {
            @Override
            public List<Integer> getVersionArray() {
                return array;
            }

            @Override
            public int getWireVersion() {
                return wire;
            }

            @Override
            public String toVersionString() {
                return parts[0] + "." + parts[1] + ".0";
            }
        };
    }

    public static void main(String[] args) throws Exception {
        if (args.length != 3) {
            System.err.println("usage: MongoServer.java HOST PORT DATAFILE");
            System.exit(2);
        }
        String host = args[0];
        int port = Integer.parseInt(args[1]);
        File dataFile = new File(args[2]).getAbsoluteFile();
        File dir = dataFile.getParentFile();
        if (dir != null && !dir.isDirectory() && !dir.mkdirs()) {
            System.err.println("cannot create data directory " + dir);
            System.exit(1);
        }

        // Opening fails (MVStoreException) if another process holds the file.
        MongoVersion version = advertisedVersion();
        H2Backend backend = new H2Backend(dataFile.getPath());
        backend.version(version);
        de.bwaldvogel.mongo.MongoServer server = new de.bwaldvogel.mongo.MongoServer(backend);
        try {
            server.bind(host, port);
        } catch (RuntimeException e) {
            System.err.println("cannot bind " + host + ":" + port + ": " + e);
            backend.close();
            System.exit(1);
        }

        CountDownLatch stopped = new CountDownLatch(1);
        Runtime.getRuntime().addShutdownHook(new Thread(() -> {
            System.out.println("mongo-java-server shutting down");
            try {
                server.shutdown(); // stops listening, closes connections, closes the backend (MVStore)
            } catch (RuntimeException e) {
                System.err.println("error during shutdown: " + e);
                try {
                    backend.close();
                } catch (RuntimeException ignored) {
                    // the store may already be closed
                }
            }
            System.out.println("mongo-java-server stopped, store closed");
            System.out.flush();
            stopped.countDown();
        }, "mongo-shutdown"));

        System.out.println("mongo-java-server listening on " + host + ":" + port + " (MongoDB " + version.toVersionString()
                + ", wire version " + version.getWireVersion() + ", data " + dataFile + ")");
        System.out.flush();
        stopped.await();
    }
}
