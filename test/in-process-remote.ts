/** A RemoteStorage talking to serve() over in-process streams: the real client and server loop, no ssh. */
import { PassThrough } from 'node:stream';
import { RemoteStorage } from '../src/drivers/ssh.js';
import { serve, type ServeOptions } from '../src/server/serve.js';
import type { Storage } from '../src/storage/types.js';

/** `served` settles with serve()'s exit status once the remote is closed. */
export async function inProcessRemote(storage: Storage, location: string, options: ServeOptions = {}): Promise<{ remote: RemoteStorage; served: Promise<number> }> {
  const up = new PassThrough();
  const down = new PassThrough();
  const served = serve(up, down, storage, options);
  const transport = {
    readable: down,
    writable: up,
    describe: () => 'in-process server',
    close: async () => {
      up.end();
      await served;
    },
  };
  return { remote: await RemoteStorage.open(transport, location), served };
}
