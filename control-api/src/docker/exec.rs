//! Running a short command inside a workspace and reading what it prints: how the GPU
//! utilisation of a host with no API process of its own is read (`nvidia-smi` inside each GPU
//! workspace sees exactly that workspace's GPUs), and how account keys reach a running
//! workspace.
//!
//! The command runs in a container its user controls, so what it prints is untrusted: the
//! output is cut at a byte limit, the whole call at the client's time-out, and callers accept
//! only what matches what they already know (see `crate::gpu_activity`).

use bollard::exec::{CreateExecOptions, StartExecOptions, StartExecResults};
use futures_util::StreamExt;

use super::client::DockerClient;
use super::error::{server_message, DockerError};

/// What a command printed and how it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    /// Its standard output, at most the caller's limit (lossy UTF-8).
    pub stdout: String,
    /// Whether the output went past the limit (the rest was not read).
    pub truncated: bool,
    /// Its exit code (`None` if the engine did not report one).
    pub exit_code: Option<i64>,
}

impl DockerClient {
    /// Runs `cmd` in `container` (as `user`, or its default user when `None`; no TTY, no
    /// input) and collects at most `limit` bytes of its standard output; standard error is
    /// dropped.
    pub async fn exec_output(
        &self,
        container: &str,
        user: Option<&str>,
        cmd: &[String],
        limit: usize,
    ) -> Result<ExecOutput, DockerError> {
        let failed = |e: bollard::errors::Error| DockerError::Exec(container.to_string(), server_message(&e));
        let opts = CreateExecOptions::<String> {
            cmd: Some(cmd.to_vec()),
            attach_stdout: Some(true),
            attach_stderr: Some(false),
            tty: Some(false),
            user: user.map(str::to_string),
            ..Default::default()
        };
        let id = self.timed("exec create", self.docker.create_exec(container, opts)).await?.map_err(failed)?.id;
        let start = StartExecOptions { detach: false, tty: false, output_capacity: None };
        let mut bytes: Vec<u8> = vec![];
        let mut truncated = false;
        let read = async {
            match self.docker.start_exec(&id, Some(start)).await? {
                StartExecResults::Attached { mut output, .. } => {
                    while let Some(chunk) = output.next().await {
                        let chunk = chunk?.into_bytes();
                        let room = limit.saturating_sub(bytes.len());
                        bytes.extend_from_slice(&chunk[..chunk.len().min(room)]);
                        if chunk.len() > room {
                            truncated = true;
                            break;
                        }
                    }
                    Ok(())
                }
                StartExecResults::Detached => Ok(()),
            }
        };
        self.timed("exec", read).await?.map_err(failed)?;
        let exit_code = if truncated {
            None
        } else {
            self.timed("exec inspect", self.docker.inspect_exec(&id)).await?.map_err(failed)?.exit_code
        };
        Ok(ExecOutput { stdout: String::from_utf8_lossy(&bytes).into_owned(), truncated, exit_code })
    }
}
