/* The subcommands of build/modernbert. Each takes the arguments after its name (argv[0] is the subcommand name) and
 * returns the process exit code. Each prints its own --help. */
#ifndef MB_COMMANDS_H
#define MB_COMMANDS_H

int mb_cmd_bench(int argc, char **argv);
int mb_cmd_check(int argc, char **argv);
int mb_cmd_eval(int argc, char **argv);
int mb_cmd_finetune(int argc, char **argv);
int mb_cmd_glue(int argc, char **argv);
int mb_cmd_plot(int argc, char **argv);
int mb_cmd_pretrain(int argc, char **argv);
int mb_cmd_tokenize(int argc, char **argv);

#endif
