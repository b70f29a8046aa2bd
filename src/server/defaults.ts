/** Where `snapcrypt-server install` puts things unless told otherwise (a module of its own, so that the program's help text does not load the installer). */
export const DEFAULTS = {
  etc: '/etc',
  sudoersDir: '/etc/sudoers.d',
  sudoersName: 'snapcrypt',
  sshdConfigDir: '/etc/ssh/sshd_config.d',
  libDir: '/usr/local/lib/snapcrypt',
  group: 'snapcrypt',
  homeBase: '/var/lib/snapcrypt/home',
  /** The textfile collector's directory of Debian's prometheus-node-exporter. */
  metricsDir: '/var/lib/prometheus/node-exporter',
} as const;
