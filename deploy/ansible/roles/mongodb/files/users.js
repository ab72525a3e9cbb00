// Run by mongosh --nodb from roles/mongodb (engine mongodb). Idempotent:
// prints CHANGED only when it created a user or reset a password.
const env = process.env;
const uri = env.SG_MONGO_URI;
let changed = false;

function login(dbName, user, pwd) {
  const conn = new Mongo(uri);
  try {
    conn.getDB(dbName).auth(user, pwd);
    return conn;
  } catch (e) {
    conn.close();
    return null;
  }
}

let admin = login("admin", env.SG_ADMIN_USER, env.SG_ADMIN_PASSWORD);
if (admin === null) {
  // No users yet: the localhost exception lets us create the first one.
  const bare = new Mongo(uri);
  bare.getDB("admin").createUser({ user: env.SG_ADMIN_USER, pwd: env.SG_ADMIN_PASSWORD, roles: ["root"] });
  bare.close();
  changed = true;
  admin = login("admin", env.SG_ADMIN_USER, env.SG_ADMIN_PASSWORD);
  if (admin === null) throw new Error("cannot log in as the admin user just created");
}

const app = login(env.SG_APP_DB, env.SG_APP_USER, env.SG_APP_PASSWORD);
if (app === null) {
  const db = admin.getDB(env.SG_APP_DB);
  if (db.getUser(env.SG_APP_USER) === null) {
    db.createUser({ user: env.SG_APP_USER, pwd: env.SG_APP_PASSWORD, roles: [{ role: "readWrite", db: env.SG_APP_DB }] });
  } else {
    db.updateUser(env.SG_APP_USER, { pwd: env.SG_APP_PASSWORD });
  }
  changed = true;
} else {
  app.close();
}
admin.close();
print(changed ? "CHANGED" : "OK");
