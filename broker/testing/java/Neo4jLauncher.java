import java.io.BufferedReader;
import java.io.IOException;
import java.io.InputStreamReader;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.Paths;
import java.nio.file.StandardCopyOption;
import java.util.Comparator;
import java.util.Map;
import java.util.stream.Stream;

import org.neo4j.dbms.api.DatabaseManagementService;
import org.neo4j.dbms.api.DatabaseManagementServiceBuilder;

/**
 * Runs one Neo4j DBMS, with its Bolt connector, for the tests of broker.
 *
 * Arguments: home directory, settings file, ready file, and a directory to
 * remove if the parent dies ("-" for none). Standard input carries the
 * password on its first line (never the command line), then "STOP". End of
 * input without STOP means the parent died. The JVM always ends through
 * System.exit, so no thread of the DBMS can keep it alive.
 */
public final class Neo4jLauncher {
    private static final long SHUTDOWN_GRACE_MS = 30_000;

    private Neo4jLauncher() {}

    public static void main(String[] args) {
        int status;
        try {
            status = run(args);
        } catch (Throwable error) {
            error.printStackTrace();
            status = 1;
        }
        System.out.flush();
        System.err.flush();
        System.exit(status);
    }

    private static int run(String[] args) throws IOException {
        if (args.length != 4) {
            System.err.println("usage: Neo4jLauncher HOME SETTINGS READY_FILE CLEANUP_DIR|-");
            return 2;
        }
        Path home = Paths.get(args[0]);
        Path settings = Paths.get(args[1]);
        Path ready = Paths.get(args[2]);
        String cleanup = args[3];
        BufferedReader in =
                new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
        String password = in.readLine();
        if (password == null || password.isEmpty()) {
            System.err.println("no password on standard input");
            return 2;
        }
        DatabaseManagementService dbms =
                new DatabaseManagementServiceBuilder(home).loadPropertiesFromFile(settings).build();
        boolean orphaned = true;
        try {
            setPassword(dbms, password);
            password = null;
            Path partial = ready.resolveSibling(ready.getFileName() + ".part");
            Files.writeString(partial, "READY\n");
            Files.move(partial, ready, StandardCopyOption.ATOMIC_MOVE);
            System.out.println("launcher: ready");
            String line;
            while ((line = in.readLine()) != null) {
                if (line.trim().equals("STOP")) {
                    orphaned = false;
                    break;
                }
            }
        } finally {
            shutdown(dbms);
        }
        if (orphaned && !cleanup.equals("-")) {
            removeTree(Paths.get(cleanup));
        }
        return 0;
    }

    /** Sets the password of the user neo4j; over a kept directory it may be set already. */
    private static void setPassword(DatabaseManagementService dbms, String password) {
        try {
            dbms.database("system")
                    .executeTransactionally(
                            "ALTER USER neo4j SET PASSWORD $password CHANGE NOT REQUIRED",
                            Map.of("password", password));
        } catch (RuntimeException error) {
            String message = String.valueOf(error.getMessage()).toLowerCase();
            if (!message.contains("same")) {
                throw error;
            }
            System.out.println("launcher: the password was set before");
        }
    }

    /** Shuts the DBMS down, and halts the JVM if that hangs. */
    private static void shutdown(DatabaseManagementService dbms) {
        Thread watchdog = new Thread(() -> {
            try {
                Thread.sleep(SHUTDOWN_GRACE_MS);
            } catch (InterruptedException ignored) {
                return;
            }
            System.err.println("launcher: shutdown hung, halting");
            Runtime.getRuntime().halt(3);
        }, "launcher-watchdog");
        watchdog.setDaemon(true);
        watchdog.start();
        dbms.shutdown();
        watchdog.interrupt();
    }

    private static void removeTree(Path root) throws IOException {
        if (!Files.exists(root)) {
            return;
        }
        try (Stream<Path> paths = Files.walk(root)) {
            paths.sorted(Comparator.reverseOrder()).forEach(path -> path.toFile().delete());
        }
    }
}
